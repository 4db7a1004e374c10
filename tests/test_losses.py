"""Each loss against a float64 transcription of its paper's equation, written with explicit loops
from the paper (not from our implementation), plus finiteness on degenerate inputs."""

import math

import pytest
import torch

from selfsup.losses import InfoNCELoss, NTXentLoss, info_nce, nt_xent


def _cosine(u, v):
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def paper_nt_xent(z1, z2, t):
    """SimCLR eq. (1): z = [z1_1, z2_1, z1_2, z2_2, ...] (pairs (2k-1, 2k)),
    l(i,j) = -log exp(sim(z_i,z_j)/t) / sum_{k!=i} exp(sim(z_i,z_k)/t),
    L = 1/(2N) sum_k [l(2k-1,2k) + l(2k,2k-1)]."""
    n = z1.shape[0]
    z = []
    for k in range(n):
        z += [z1[k], z2[k]]

    def loss(i, j):
        numerator = math.exp(_cosine(z[i], z[j]) / t)
        denominator = sum(math.exp(_cosine(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        return -math.log(numerator / denominator)

    return sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def paper_info_nce(q, k_pos, k_neg, t):
    """CPC / MoCo: L_q = -log exp(q.k+/t) / (exp(q.k+/t) + sum_{k-} exp(q.k-/t)), averaged;
    q and k are unit vectors."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        positive = math.exp(float(qi @ (k_pos[i] / k_pos[i].norm())) / t)
        negatives = sum(math.exp(float(qi @ (k / k.norm())) / t) for k in k_neg)
        total += -math.log(positive / (positive + negatives))
    return total / q.shape[0]


def paper_info_nce_in_batch(q, k, t):
    """In-batch InfoNCE: the positive of q_i is k_i, the other keys k_j (j != i) are negatives."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        logits = [float(qi @ (k[j] / k[j].norm())) / t for j in range(k.shape[0])]
        total += -math.log(math.exp(logits[i]) / sum(math.exp(x) for x in logits))
    return total / q.shape[0]


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_nt_xent_equals_simclr_equation_in_float64(temperature):
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    z2 = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    expected = paper_nt_xent(z1, z2, temperature)
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-12)
    assert NTXentLoss(temperature)(z1, z2).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_info_nce_with_negative_keys_equals_moco_equation_in_float64(temperature):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(5, 8, dtype=torch.float64, generator=generator)
    k = torch.randn(5, 8, dtype=torch.float64, generator=generator)
    queue = torch.randn(11, 8, dtype=torch.float64, generator=generator)
    expected = paper_info_nce(q, k, queue, temperature)
    assert info_nce(q, k, queue, temperature).item() == pytest.approx(expected, rel=1e-12)
    assert InfoNCELoss(temperature)(q, k, queue).item() == pytest.approx(expected, rel=1e-12)


def test_info_nce_without_negatives_uses_the_other_keys_of_the_batch():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(7, 4, dtype=torch.float64, generator=generator)
    k = torch.randn(7, 4, dtype=torch.float64, generator=generator)
    expected = paper_info_nce_in_batch(q, k, 0.1)
    assert info_nce(q, k, temperature=0.1).item() == pytest.approx(expected, rel=1e-12)


def test_losses_are_invariant_to_embedding_scale():
    generator = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(2, 8, 16, generator=generator)
    assert torch.allclose(nt_xent(z1, z2), nt_xent(z1 * 1e3, z2 * 1e-3), atol=1e-5)
    assert torch.allclose(info_nce(z1, z2), info_nce(z1 * 1e3, z2 * 7.0), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["identical", "zeros", "huge"])
def test_losses_stay_finite_with_finite_gradients_on_degenerate_embeddings(dtype, case):
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(8, 16, generator=generator)
    z = {"identical": base[:1].repeat(8, 1), "zeros": torch.zeros(8, 16),
         "huge": base * 1e30}[case].to(dtype)
    for loss_fn in (lambda a, b: nt_xent(a, b, 0.1), lambda a, b: info_nce(a, b, None, 0.07),
                    lambda a, b: info_nce(a, b, b.flip(0), 0.07)):
        a = z.clone().requires_grad_(True)
        loss = loss_fn(a, z.clone())
        loss.backward()
        assert torch.isfinite(loss).item(), case
        assert torch.isfinite(a.grad).all().item(), case


def test_nt_xent_gradient_matches_float64_autograd_of_the_equation():
    generator = torch.Generator().manual_seed(5)
    z1 = torch.randn(4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    z2 = torch.randn(4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z1, z2))
