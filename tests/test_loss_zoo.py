"""The loss zoo (SupCon, NCE, debiased, hard-negative, FlatNCE, alignment/uniformity, triplet,
N-pair), each against a float64 transcription of its paper's equation written with explicit loops
and ``math`` (not from our implementation), their reductions to NT-Xent, and finiteness of value
and gradient on degenerate inputs in float32 and bfloat16."""

import importlib
import math

import pytest
from fake_distributed import FakeSecondOfTwoProcesses
import torch

from selfsup.losses import (dino, swav, AlignmentLoss, AlignUniformLoss, DebiasedNTXentLoss, FlatNCELoss,
                            HardNegativeNTXentLoss, MemoryBankSoftmaxLoss, NCELoss, NPairLoss,
                            SupConLoss, TripletLoss, UniformityLoss, align_uniform_loss, alignment,
                            debiased_nt_xent, flat_nce, hard_negative_nt_xent, info_nce,
                            memory_bank_softmax, n_pair, nce, nt_xent, supcon, triplet, uniformity)
from selfsup.losses.debiased import log_debiased_negative_term

REL = 1e-10


def _unit(v):
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def _dot(u, v):
    return sum(float(a) * float(b) for a, b in zip(u, v))


def _random(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- float64 transcriptions of the papers' equations -------------------------------------------

def paper_supcon(features, labels, t, anchor_samples=None):
    """Khosla et al. eq. 2 (L_out): I = all views, A(i) = I \\ {i}, P(i) = {p in A(i): y_p = y_i};
    L = mean over anchors with P(i) non-empty of -1/|P(i)| sum_p log exp(z_i.z_p/t) / sum_a
    exp(z_i.z_a/t). ``anchor_samples`` restricts the anchors to the views of those samples."""
    n, views, _ = features.shape
    anchor_samples = range(n) if anchor_samples is None else anchor_samples
    labels = list(range(n)) if labels is None else [int(y) for y in labels]
    views_list = [(_unit(features[k, v]), labels[k]) for v in range(views) for k in range(n)]
    total, anchors = 0.0, 0
    for i, (z_i, y_i) in enumerate(views_list):
        if i % n not in anchor_samples:
            continue
        others = [a for a in range(len(views_list)) if a != i]
        positives = [p for p in others if views_list[p][1] == y_i]
        if not positives:
            continue
        denominator = sum(math.exp(_dot(z_i, views_list[a][0]) / t) for a in others)
        total += -sum(math.log(math.exp(_dot(z_i, views_list[p][0]) / t) / denominator)
                      for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def paper_nce(scores, pn, m):
    """InstDisc eq. 5-6: h = P / (P + m Pn); J = -log h(data) - sum_noise log(1 - h(noise))."""
    total = 0.0
    for row in scores:
        def h(p):
            return float(p) / (float(p) + m * pn)
        total += -math.log(h(row[0])) - sum(math.log(1 - h(p)) for p in row[1:])
    return total / scores.shape[0]


def paper_memory_bank_softmax(similarities, targets, t):
    """InstDisc eq. 2-3: -log exp(s_i/t) / sum_j exp(s_j/t), averaged."""
    total = 0.0
    for row, i in zip(similarities, targets):
        total += -math.log(math.exp(float(row[i]) / t)
                           / sum(math.exp(float(s) / t) for s in row))
    return total / similarities.shape[0]


def _simclr_views(z1, z2):
    """The 2B views [z1; z2] (unit) and the index of each one's positive."""
    b = z1.shape[0]
    views = [_unit(z) for z in z1] + [_unit(z) for z in z2]
    return views, [(i + b) % (2 * b) for i in range(2 * b)]


def paper_debiased(z1, z2, tau_plus, t, anchor_samples=None):
    """Chuang et al.: g = max(1/(1-tau+) (1/N sum_neg e^{s-/t} - tau+ e^{s+/t}), e^{-1/t}),
    L = -log e^{s+/t} / (e^{s+/t} + N g), N = 2B - 2. ``anchor_samples`` restricts the anchors
    to both views of those samples."""
    views, positive = _simclr_views(z1, z2)
    big_n = len(views) - 2
    anchor_samples = range(z1.shape[0]) if anchor_samples is None else anchor_samples
    anchors = [i for i in range(len(views)) if i % z1.shape[0] in anchor_samples]
    total = 0.0
    for i in anchors:
        z_i = views[i]
        pos = math.exp(_dot(z_i, views[positive[i]]) / t)
        negs = [math.exp(_dot(z_i, views[k]) / t) for k in range(len(views))
                if k not in (i, positive[i])]
        g = max((sum(negs) / big_n - tau_plus * pos) / (1 - tau_plus), math.exp(-1 / t))
        total += -math.log(pos / (pos + big_n * g))
    return total / len(anchors)


def paper_hard_negative(z1, z2, beta, tau_plus, t):
    """Robinson et al.: w_j = e^{beta s_j/t} / (1/N sum_k e^{beta s_k/t}); the debiased estimator
    of Chuang et al. with the negative mean replaced by 1/N sum_j w_j e^{s_j/t}."""
    views, positive = _simclr_views(z1, z2)
    big_n = len(views) - 2
    total = 0.0
    for i, z_i in enumerate(views):
        pos = math.exp(_dot(z_i, views[positive[i]]) / t)
        sims = [_dot(z_i, views[k]) for k in range(len(views)) if k not in (i, positive[i])]
        importance = [math.exp(beta * s / t) for s in sims]
        mean_importance = sum(importance) / big_n
        reweighted = sum(w / mean_importance * math.exp(s / t)
                         for w, s in zip(importance, sims)) / big_n
        g = max((reweighted - tau_plus * pos) / (1 - tau_plus), math.exp(-1 / t))
        total += -math.log(pos / (pos + big_n * g))
    return total / len(views)


def paper_flat_nce_value(z1, z2, t):
    """FlatNCE statistic: per anchor log sum_neg exp((s- - s+)/t), averaged."""
    views, positive = _simclr_views(z1, z2)
    total = 0.0
    for i, z_i in enumerate(views):
        s_pos = _dot(z_i, views[positive[i]])
        total += math.log(sum(math.exp((_dot(z_i, views[k]) - s_pos) / t)
                              for k in range(len(views)) if k not in (i, positive[i])))
    return total / len(views)


def _autograd_anchor_terms(z1, z2, t):
    """Per anchor (l+, [l-]) as float64 autograd scalars, one loop per anchor and negative."""
    b = z1.shape[0]
    views = [z / z.norm() for z in z1] + [z / z.norm() for z in z2]
    for i in range(2 * b):
        p = (i + b) % (2 * b)
        yield ((views[i] * views[p]).sum() / t,
               [(views[i] * views[k]).sum() / t for k in range(2 * b) if k not in (i, p)])


def paper_flat_nce_surrogate(z1, z2, t):
    """Algorithm 1 of Chen et al.: v = logsumexp(l- - l+), loss = mean exp(v - v.detach())."""
    terms = []
    for l_pos, l_negs in _autograd_anchor_terms(z1, z2, t):
        v = torch.log(sum(torch.exp(l - l_pos) for l in l_negs))
        terms.append(torch.exp(v - v.detach()))
    return sum(terms) / len(terms)


def nt_xent_rescaled_by_one_minus_p_positive(z1, z2, t):
    """sum over anchors of NT-Xent_i / (1 - p+_i), p+ held constant, over 2B."""
    terms = []
    for l_pos, l_negs in _autograd_anchor_terms(z1, z2, t):
        denominator = torch.exp(l_pos) + sum(torch.exp(l) for l in l_negs)
        p_pos = (torch.exp(l_pos) / denominator).detach()
        terms.append(-torch.log(torch.exp(l_pos) / denominator) / (1 - p_pos))
    return sum(terms) / len(terms)


def paper_alignment(x, y, alpha):
    """Wang & Isola: E ||f(x) - f(y)||^alpha on unit vectors."""
    total = 0.0
    for u, v in zip(x, y):
        u, v = _unit(u), _unit(v)
        total += math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(u, v))) ** alpha
    return total / x.shape[0]


def paper_uniformity(x, t):
    """Wang & Isola: log E_{i<j} exp(-t ||f(x_i) - f(x_j)||^2) on unit vectors."""
    units = [_unit(u) for u in x]
    terms = [math.exp(-t * sum((float(a) - float(b)) ** 2 for a, b in zip(units[i], units[j])))
             for i in range(len(units)) for j in range(i + 1, len(units))]
    return math.log(sum(terms) / len(terms))


def paper_triplet(a, p, n, margin):
    """FaceNet: mean [ ||a-p||^2 - ||a-n||^2 + margin ]_+ on unit vectors."""
    total = 0.0
    for ai, pi, ni in zip(a, p, n):
        ai, pi, ni = _unit(ai), _unit(pi), _unit(ni)
        d_pos = sum((float(x) - float(y)) ** 2 for x, y in zip(ai, pi))
        d_neg = sum((float(x) - float(y)) ** 2 for x, y in zip(ai, ni))
        total += max(0.0, d_pos - d_neg + margin)
    return total / a.shape[0]


def paper_n_pair(a, p):
    """Sohn: mean_i log(1 + sum_{j != i} exp(a_i.p_j - a_i.p_i)) on unit vectors."""
    units_a, units_p = [_unit(u) for u in a], [_unit(u) for u in p]
    total = 0.0
    for i, ai in enumerate(units_a):
        own = _dot(ai, units_p[i])
        total += math.log(1 + sum(math.exp(_dot(ai, units_p[j]) - own)
                                  for j in range(len(units_p)) if j != i))
    return total / len(units_a)


# ---- each loss equals its paper's equation in float64 ------------------------------------------

@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_equals_the_l_out_equation_in_float64(views, temperature):
    features = _random(6, views, 5, seed=0)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    expected = paper_supcon(features, labels, temperature)
    assert supcon(features, labels, temperature).item() == pytest.approx(expected, rel=REL)
    assert SupConLoss(temperature)(features, labels).item() == pytest.approx(expected, rel=REL)


def test_supcon_without_labels_is_nt_xent():
    z1, z2 = _random(5, 7, seed=1), _random(5, 7, seed=2)
    expected = nt_xent(z1, z2, 0.3).item()
    assert supcon(torch.stack([z1, z2], dim=1), None, 0.3).item() == pytest.approx(expected,
                                                                                   rel=1e-12)


def test_supcon_with_every_label_unique_equals_the_unlabelled_case():
    features = _random(5, 3, 4, seed=3)
    unique = torch.tensor([4, 0, 3, 1, 2])
    assert supcon(features, unique, 0.2).item() == pytest.approx(
        supcon(features, None, 0.2).item(), rel=1e-12)
    assert supcon(features, None, 0.2).item() == pytest.approx(
        paper_supcon(features, None, 0.2), rel=REL)


def test_supcon_base_temperature_scales_the_loss_by_temperature_over_base():
    features, labels = _random(6, 2, 4, seed=4), torch.tensor([0, 0, 1, 1, 2, 3])
    plain = supcon(features, labels, 0.1).item()
    assert supcon(features, labels, 0.1, base_temperature=0.07).item() == pytest.approx(
        plain * 0.1 / 0.07, rel=1e-12)


def test_supcon_anchor_without_positive_is_left_out_of_the_mean():
    # One view; class 2 appears once, so its anchor has no positive.
    features = _random(5, 1, 4, seed=5).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    loss = supcon(features, labels, 0.1)
    loss.backward()
    assert torch.isfinite(loss).item() and torch.isfinite(features.grad).all().item()
    assert loss.item() == pytest.approx(paper_supcon(features.detach(), labels, 0.1), rel=REL)


def test_supcon_with_no_positive_anywhere_is_zero_with_zero_gradient():
    features = _random(4, 1, 3, seed=6).requires_grad_(True)
    loss = supcon(features, torch.arange(4), 0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_supcon_gradient_passes_gradcheck():
    features = _random(4, 2, 3, seed=7).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2])
    assert torch.autograd.gradcheck(lambda f: supcon(f, labels, 0.5), (features,))


def test_nce_equals_instdisc_equation_in_float64():
    generator = torch.Generator().manual_seed(8)
    scores = torch.rand(4, 1 + 6, dtype=torch.float64, generator=generator) * 3 + 1e-3
    pn = 1 / 50
    expected = paper_nce(scores, pn, 6)
    assert nce(scores, pn, 6).item() == pytest.approx(expected, rel=REL)
    assert NCELoss(pn, 6)(scores).item() == pytest.approx(expected, rel=REL)
    assert nce(scores, torch.full((), pn, dtype=torch.float64), 6).item() == pytest.approx(
        expected, rel=REL)


def test_nce_rejects_a_noise_count_that_does_not_match_the_scores():
    with pytest.raises(ValueError):
        nce(torch.ones(2, 5), 0.01, 3)


def test_memory_bank_softmax_equals_the_non_parametric_softmax_in_float64():
    similarities = torch.tanh(_random(4, 9, seed=9))
    targets = torch.tensor([0, 3, 8, 5])
    expected = paper_memory_bank_softmax(similarities, targets, 0.07)
    assert memory_bank_softmax(similarities, targets, 0.07).item() == pytest.approx(expected,
                                                                                    rel=REL)
    assert MemoryBankSoftmaxLoss(0.07)(similarities, targets).item() == pytest.approx(expected,
                                                                                      rel=REL)


def _close_pairs(b, d, seed, noise=0.05):
    """Views whose positives are nearly identical, so tau+ e^{s+/t} exceeds the negative mean and
    the exp(-1/t) clamp of the debiased estimator is exercised."""
    z1 = _random(b, d, seed=seed)
    return z1, z1 + noise * _random(b, d, seed=seed + 100)


@pytest.mark.parametrize("tau_plus,temperature,close", [(0.1, 0.5, False), (0.3, 0.2, False),
                                                        (0.5, 0.5, True)])
def test_debiased_nt_xent_equals_chuang_equation_in_float64(tau_plus, temperature, close):
    z1, z2 = _close_pairs(6, 5, 10) if close else (_random(6, 5, seed=10), _random(6, 5, seed=11))
    expected = paper_debiased(z1, z2, tau_plus, temperature)
    assert debiased_nt_xent(z1, z2, tau_plus, temperature).item() == pytest.approx(expected,
                                                                                   rel=REL)
    assert DebiasedNTXentLoss(tau_plus, temperature)(z1, z2).item() == pytest.approx(expected,
                                                                                     rel=REL)


def test_debiased_clamp_is_active_in_the_close_pairs_case():
    # Guards the test above: with close pairs some anchors must hit the exp(-1/t) floor.
    z1, z2 = _close_pairs(6, 5, 10)
    views, positive = _simclr_views(z1, z2)
    clamped = 0
    for i, z_i in enumerate(views):
        pos = math.exp(_dot(z_i, views[positive[i]]) / 0.5)
        negs = [math.exp(_dot(z_i, views[k]) / 0.5) for k in range(12) if k not in (i, positive[i])]
        clamped += (sum(negs) / 10 - 0.5 * pos) / 0.5 < math.exp(-2)
    assert 0 < clamped


@pytest.mark.parametrize("beta,tau_plus,close", [(1.0, 0.1, False), (0.5, 0.0, False),
                                                 (2.0, 0.5, True)])
def test_hard_negative_nt_xent_equals_robinson_equation_in_float64(beta, tau_plus, close):
    z1, z2 = _close_pairs(6, 5, 12) if close else (_random(6, 5, seed=12), _random(6, 5, seed=13))
    expected = paper_hard_negative(z1, z2, beta, tau_plus, 0.5)
    assert hard_negative_nt_xent(z1, z2, beta, tau_plus, 0.5).item() == pytest.approx(expected,
                                                                                      rel=REL)
    assert HardNegativeNTXentLoss(beta, tau_plus, 0.5)(z1, z2).item() == pytest.approx(expected,
                                                                                       rel=REL)


def test_debiased_without_class_prior_is_nt_xent():
    z1, z2 = _random(7, 6, seed=14), _random(7, 6, seed=15)
    assert debiased_nt_xent(z1, z2, 0.0, 0.5).item() == pytest.approx(
        nt_xent(z1, z2, 0.5).item(), rel=1e-12)


def test_hard_negative_without_hardness_or_class_prior_is_nt_xent():
    z1, z2 = _random(7, 6, seed=16), _random(7, 6, seed=17)
    assert hard_negative_nt_xent(z1, z2, 0.0, 0.0, 0.5).item() == pytest.approx(
        nt_xent(z1, z2, 0.5).item(), rel=1e-12)


def test_hard_negative_without_hardness_is_the_debiased_loss():
    z1, z2 = _random(7, 6, seed=18), _random(7, 6, seed=19)
    assert hard_negative_nt_xent(z1, z2, 0.0, 0.1, 0.5).item() == pytest.approx(
        debiased_nt_xent(z1, z2, 0.1, 0.5).item(), rel=1e-12)


@pytest.mark.parametrize("excess", [0.0, 0.5])
def test_debiased_estimate_at_or_below_zero_falls_to_the_clamp_with_finite_gradient(excess):
    # sum_j e^{l_j} - N tau+ e^{l+} is exactly 0 (or negative): the log of the difference is
    # -inf there, and its discarded branch must not put 0 * inf into the gradient.
    positives = torch.tensor([0.3, 1.2], dtype=torch.float64, requires_grad=True)
    num_negatives, tau_plus, temperature = 6, 0.2, 0.5
    log_negative_sum = positives + math.log(num_negatives * tau_plus) - excess
    term = log_debiased_negative_term(log_negative_sum, positives, num_negatives, tau_plus,
                                      temperature)
    term.sum().backward()
    assert torch.equal(term.detach(), torch.full((2,), math.log(num_negatives) - 1 / temperature,
                                                 dtype=torch.float64))
    assert torch.equal(positives.grad, torch.zeros(2, dtype=torch.float64))


def test_debiased_and_hard_negative_gradients_pass_gradcheck():
    z1 = _random(4, 3, seed=20).requires_grad_(True)
    z2 = _random(4, 3, seed=21).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: debiased_nt_xent(a, b, 0.1, 0.5), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: hard_negative_nt_xent(a, b, 1.0, 0.1, 0.5),
                                    (z1, z2))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_flat_nce_value_is_the_logsumexp_statistic_in_float64(temperature):
    z1, z2 = _random(5, 4, seed=22), _random(5, 4, seed=23)
    expected = paper_flat_nce_value(z1, z2, temperature)
    assert flat_nce(z1, z2, temperature).item() == pytest.approx(expected, rel=REL)
    assert FlatNCELoss(temperature)(z1, z2).item() == pytest.approx(expected, rel=REL)


def test_flat_nce_gradient_equals_algorithm_1_surrogate_in_float64():
    z1 = _random(4, 5, seed=24).requires_grad_(True)
    z2 = _random(4, 5, seed=25).requires_grad_(True)
    ours = torch.autograd.grad(flat_nce(z1, z2, 0.2), (z1, z2))
    reference = torch.autograd.grad(paper_flat_nce_surrogate(z1, z2, 0.2), (z1, z2))
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_flat_nce_gradient_is_nt_xents_divided_by_one_minus_p_positive_per_anchor():
    # Per anchor, NT-Xent = softplus(v) so its gradient is (1 - p+) grad v; FlatNCE's is grad v.
    # The two gradients are therefore not equal, only parallel anchor by anchor.
    z1 = _random(4, 5, seed=26).requires_grad_(True)
    z2 = _random(4, 5, seed=27).requires_grad_(True)
    ours = torch.autograd.grad(flat_nce(z1, z2, 0.2), (z1, z2))
    rescaled = torch.autograd.grad(nt_xent_rescaled_by_one_minus_p_positive(z1, z2, 0.2), (z1, z2))
    for got, want in zip(ours, rescaled):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    plain = torch.autograd.grad(nt_xent(z1, z2, 0.2), (z1, z2))
    assert not torch.allclose(ours[0], plain[0], rtol=1e-3)


def test_flat_nce_gradient_survives_where_nt_xents_underflows_in_float32():
    # Confident positives (v = log 6 - 100): NT-Xent's gradient carries the factor
    # 1 - p+ = e^v / (1 + e^v) and underflows; FlatNCE's self-normalised gradient does not.
    gradients = {}
    for loss_fn in (flat_nce, nt_xent):
        z1 = torch.eye(4).requires_grad_(True)
        loss = loss_fn(z1, torch.eye(4), 0.01)
        loss.backward()
        assert torch.isfinite(loss).item()
        gradients[loss_fn] = z1.grad.abs().max().item()
    assert flat_nce(torch.eye(4), torch.eye(4), 0.01).item() == pytest.approx(
        math.log(6) - 100, rel=1e-6)
    assert gradients[nt_xent] < 1e-30 < 1.0 < gradients[flat_nce]


@pytest.mark.parametrize("alpha", [1, 2])
def test_alignment_equals_wang_isola_equation_in_float64(alpha):
    x, y = _random(6, 4, seed=28), _random(6, 4, seed=29)
    expected = paper_alignment(x, y, alpha)
    assert alignment(x, y, alpha).item() == pytest.approx(expected, rel=REL)
    assert AlignmentLoss(alpha)(x, y).item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("t", [1, 2])
def test_uniformity_equals_wang_isola_equation_in_float64(t):
    x = _random(7, 4, seed=30)
    expected = paper_uniformity(x, t)
    assert uniformity(x, t).item() == pytest.approx(expected, rel=REL)
    assert UniformityLoss(t)(x).item() == pytest.approx(expected, rel=REL)


def test_align_uniform_loss_is_the_papers_weighted_sum():
    x, y = _random(6, 4, seed=31), _random(6, 4, seed=32)
    expected = paper_alignment(x, y, 2) + 0.5 * (paper_uniformity(x, 2)
                                                 + paper_uniformity(y, 2)) / 2
    assert align_uniform_loss(x, y, 2, 2, 0.5).item() == pytest.approx(expected, rel=REL)
    assert AlignUniformLoss(2, 2, 0.5)(x, y).item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_equals_facenet_equation_in_float64(margin):
    a, p, n = _random(8, 4, seed=33), _random(8, 4, seed=34), _random(8, 4, seed=35)
    expected = paper_triplet(a, p, n, margin)
    assert 0 < expected  # some hinges active, so the test is not trivially 0 == 0
    assert triplet(a, p, n, margin).item() == pytest.approx(expected, rel=REL)
    assert TripletLoss(margin)(a, p, n).item() == pytest.approx(expected, rel=REL)


def test_n_pair_equals_sohn_equation_in_float64():
    a, p = _random(6, 4, seed=36), _random(6, 4, seed=37)
    expected = paper_n_pair(a, p)
    assert n_pair(a, p).item() == pytest.approx(expected, rel=REL)
    assert NPairLoss()(a, p).item() == pytest.approx(expected, rel=REL)
    # On unit vectors N-pair is in-batch InfoNCE at temperature 1.
    assert info_nce(a, p, temperature=1.0).item() == pytest.approx(expected, rel=REL)


# ---- degenerate inputs: finite value, finite gradient ------------------------------------------

def _two_views(z):
    return z, z.flip(0)


ADVERSARIAL_LOSSES = {
    "supcon": lambda z: supcon(torch.stack(_two_views(z), dim=1), torch.arange(z.shape[0]) % 3),
    "supcon_no_positives": lambda z: supcon(z.unsqueeze(1), torch.arange(z.shape[0])),
    "nce": lambda z: nce(z[:, :5].abs(), 1e-4, 4),
    "memory_bank_softmax": lambda z: memory_bank_softmax(
        z[:, :6], torch.arange(z.shape[0]) % 6, 0.07),
    "debiased_nt_xent": lambda z: debiased_nt_xent(*_two_views(z), 0.1, 0.1),
    "hard_negative_nt_xent": lambda z: hard_negative_nt_xent(*_two_views(z), 1.0, 0.1, 0.1),
    "flat_nce": lambda z: flat_nce(*_two_views(z), 0.1),
    "alignment": lambda z: alignment(*_two_views(z)),
    "alignment_alpha_1": lambda z: alignment(*_two_views(z), alpha=1),
    "uniformity": lambda z: uniformity(z),
    "align_uniform_loss": lambda z: align_uniform_loss(*_two_views(z)),
    "triplet": lambda z: triplet(z, z.flip(0), z.roll(1, 0)),
    "n_pair": lambda z: n_pair(*_two_views(z)),
    "swav": lambda z: swav(list(_two_views(z))),
    "dino": lambda z: dino(list(_two_views(z)), list(_two_views(z)), torch.zeros(z.shape[1])),
}
# DINO returns its loss in float32 for bf16 logits on purpose (see selfsup.losses.dino).
FLOAT32_RESULT = {"dino"}
NEEDS_TWO_SAMPLES = {"debiased_nt_xent", "hard_negative_nt_xent", "flat_nce", "uniformity",
                     "align_uniform_loss"}


def _degenerate(case, dtype):
    base = torch.randn(8, 16, generator=torch.Generator().manual_seed(38))
    return {"identical": base[:1].repeat(8, 1), "zeros": torch.zeros(8, 16),
            "huge": base * 1e30, "one_sample": base[:1]}[case].to(dtype)


DEGENERATE_CASES = [(name, case) for name in sorted(ADVERSARIAL_LOSSES)
                    for case in ("identical", "zeros", "huge", "one_sample")
                    # A one-sample batch has no negative / no pair for these: they raise instead.
                    if not (case == "one_sample" and name in NEEDS_TWO_SAMPLES)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,case", DEGENERATE_CASES)
def test_loss_and_gradient_stay_finite_on_degenerate_embeddings(name, case, dtype):
    z = _degenerate(case, dtype).requires_grad_(True)
    loss = ADVERSARIAL_LOSSES[name](z)
    loss.backward()
    assert loss.dtype == (torch.float32 if name in FLOAT32_RESULT else dtype)
    assert torch.isfinite(loss).item(), (name, case)
    assert torch.isfinite(z.grad).all().item(), (name, case)


@pytest.mark.parametrize("name", sorted(NEEDS_TWO_SAMPLES))
def test_losses_that_need_a_pair_reject_a_one_sample_batch(name):
    with pytest.raises(ValueError):
        ADVERSARIAL_LOSSES[name](torch.randn(1, 16))


# ---- gather_distributed in a single process ----------------------------------------------------

@pytest.mark.parametrize("name", ["supcon", "supcon_labels", "debiased_nt_xent",
                                  "hard_negative_nt_xent", "flat_nce"])
def test_gather_distributed_in_one_process_changes_nothing(name):
    z1, z2 = _random(5, 4, seed=39), _random(5, 4, seed=40)
    labels = torch.tensor([0, 1, 0, 1, 2])
    loss = {"supcon": lambda g: supcon(torch.stack([z1, z2], 1), gather_distributed=g),
            "supcon_labels": lambda g: supcon(torch.stack([z1, z2], 1), labels,
                                              gather_distributed=g),
            "debiased_nt_xent": lambda g: debiased_nt_xent(z1, z2, gather_distributed=g),
            "hard_negative_nt_xent": lambda g: hard_negative_nt_xent(z1, z2,
                                                                     gather_distributed=g),
            "flat_nce": lambda g: flat_nce(z1, z2, gather_distributed=g)}[name]
    assert loss(True).item() == pytest.approx(loss(False).item(), rel=1e-12)


@pytest.mark.parametrize("labelled", [False, True])
def test_supcon_on_the_second_of_two_processes_matches_its_anchors_of_the_whole_batch(
        monkeypatch, labelled):
    # import_module, not "import ... as": the package's function supcon shadows its module.
    module = importlib.import_module("selfsup.losses.supcon")
    features = torch.nn.functional.normalize(_random(8, 2, 3, seed=41), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 0, 2])
    local_labels = labels[4:] if labelled else None
    rank_zero_parts = [features[:4]] + ([labels[:4]] if labelled else [])
    fake = FakeSecondOfTwoProcesses(monkeypatch, module, rank_zero_parts)
    loss = supcon(features[4:], local_labels, 0.5, gather_distributed=True)
    expected = paper_supcon(features, labels if labelled else None, 0.5, anchor_samples=range(4, 8))
    assert not fake.parts  # every rank-0 part was gathered
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_two_view_losses_on_the_second_of_two_processes_match_their_anchors_of_the_whole_batch(
        monkeypatch):
    module = importlib.import_module("selfsup.losses._two_view")
    z1 = torch.nn.functional.normalize(_random(6, 3, seed=42), dim=-1)
    z2 = torch.nn.functional.normalize(_random(6, 3, seed=43), dim=-1)
    fake = FakeSecondOfTwoProcesses(monkeypatch, module, [z1[:3], z2[:3]])
    loss = debiased_nt_xent(z1[3:], z2[3:], 0.1, 0.5, gather_distributed=True)
    expected = paper_debiased(z1, z2, 0.1, 0.5, anchor_samples=range(3, 6))
    assert not fake.parts
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_supcon_loss_and_gradients_repeat_bitwise_on_the_cpu():
    # A per-anchor gather of the class sums needed a scatter-add in backward, which CPU threads
    # add in varying order: SupCon training runs differed in the last bits, then in accuracy.
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(128, 2, 128, generator=generator)
    labels = torch.randint(0, 10, (128,), generator=generator)
    runs = []
    for _ in range(20):
        leaf = features.clone().requires_grad_(True)
        loss = supcon(leaf, labels, 0.1)
        loss.backward()
        runs.append((loss.detach(), leaf.grad))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
