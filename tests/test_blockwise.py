"""The blockwise (tiled, online log-sum-exp) losses: value and gradient equal the dense computation
for any tile size, in one process and as the second of two processes (the keys' gradient included),
float64 gradcheck of the custom autograd Function, finiteness on degenerate inputs in float32 and
bfloat16, and an autograd graph that holds no anchor x key matrix."""

import importlib

import pytest
from fake_distributed import FakeSecondOfTwoProcesses
import torch
import torch.nn.functional as F

from selfsup.losses import InfoNCELoss, NTXentLoss, SupConLoss, info_nce, nt_xent, supcon
from selfsup.losses.blockwise import CPU_BLOCK, contrastive_logsumexp, resolve_block_size

# 2N = 26 anchors: 2 and 13 divide it, 4 and 7 do not; 0 is one dense tile, 100 exceeds it.
BLOCK_SIZES = [0, 2, 4, 7, 13, 100, None]


def _random(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def assert_relative_close(got, want, rel):
    """Largest deviation within ``rel`` of the largest magnitude (no atol to tune per case)."""
    assert got.dtype == want.dtype
    deviation = (got - want).abs().max().item()
    assert deviation <= rel * want.abs().max().item(), (deviation, want.abs().max().item())


# ---- dense references: the whole logit matrix, masked, through torch's cross-entropy -------------

def dense_nt_xent(z1, z2, t, anchor_samples=None):
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n) + n, torch.arange(n)])
    losses = F.cross_entropy(logits, targets, reduction="none")
    samples = torch.arange(n) if anchor_samples is None else torch.as_tensor(anchor_samples)
    return losses[torch.cat([samples, samples + n])].mean()


def dense_info_nce(q, k, negatives, t, anchor_rows=None):
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if negatives is None:
        logits, targets = q @ k.T / t, torch.arange(q.shape[0])
    else:
        logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ F.normalize(negatives, dim=-1).T],
                           dim=1) / t
        targets = torch.zeros(q.shape[0], dtype=torch.long)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses if anchor_rows is None else losses[anchor_rows].mean()


def dense_supcon(features, labels, t, anchor_samples=None):
    n, views, _ = features.shape
    labels = torch.arange(n) if labels is None else labels
    z = F.normalize(features, dim=-1).transpose(0, 1).reshape(n * views, -1)
    all_labels = labels.repeat(views)
    self_mask = torch.eye(n * views, dtype=torch.bool)
    log_prob = torch.log_softmax((z @ z.T / t).masked_fill(self_mask, float("-inf")), dim=1)
    positives = (all_labels[:, None] == all_labels[None, :]) & ~self_mask
    count = positives.sum(1)
    per_anchor = -torch.where(positives, log_prob, 0.0).sum(1) / count.clamp(min=1)
    samples = torch.arange(n) if anchor_samples is None else torch.as_tensor(anchor_samples)
    rows = (samples[None, :] + n * torch.arange(views)[:, None]).reshape(-1)
    keep = count[rows] > 0
    return per_anchor[rows][keep].mean()


def _gradients(loss_fn, inputs):
    leaves = _leaves(*inputs)
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


CASES = {
    "nt_xent": (lambda b: lambda z1, z2: nt_xent(z1, z2, 0.2, block_size=b),
                lambda z1, z2: dense_nt_xent(z1, z2, 0.2),
                lambda: (_random(13, 16, seed=0), _random(13, 16, seed=1))),
    "info_nce_in_batch": (lambda b: lambda q, k: info_nce(q, k, None, 0.1, block_size=b),
                          lambda q, k: dense_info_nce(q, k, None, 0.1).mean(),
                          lambda: (_random(26, 16, seed=2), _random(26, 16, seed=3))),
    "info_nce_negative_keys": (
        lambda b: lambda q, k, neg: info_nce(q, k, neg, 0.07, block_size=b),
        lambda q, k, neg: dense_info_nce(q, k, neg, 0.07).mean(),
        lambda: (_random(26, 16, seed=4), _random(26, 16, seed=5), _random(31, 16, seed=6))),
    "supcon_labels": (
        lambda b: lambda f: supcon(f, torch.arange(13) % 4, 0.1, block_size=b),
        lambda f: dense_supcon(f, torch.arange(13) % 4, 0.1),
        lambda: (_random(13, 2, 16, seed=7),)),
    # One view: the samples alone in their class have no positive and leave the mean.
    "supcon_singletons": (
        lambda b: lambda f: supcon(f, torch.tensor([0, 1, 1, 2, 3, 3, 3] * 3 + [4, 5, 6, 6, 7]),
                                   0.1, block_size=b),
        lambda f: dense_supcon(f, torch.tensor([0, 1, 1, 2, 3, 3, 3] * 3 + [4, 5, 6, 6, 7]), 0.1),
        lambda: (_random(26, 1, 16, seed=8),)),
    "supcon_no_labels": (lambda b: lambda f: supcon(f, None, 0.5, block_size=b),
                         lambda f: dense_supcon(f, None, 0.5),
                         lambda: (_random(13, 2, 16, seed=9),)),
}


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_value_and_gradient_match_the_dense_float64_computation(name, block_size):
    blockwise, dense, make_inputs = CASES[name]
    inputs = make_inputs()
    loss, grads = _gradients(blockwise(block_size), inputs)
    want_loss, want_grads = _gradients(dense, [x.double() for x in inputs])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    for got, want in zip(grads, want_grads):
        assert_relative_close(got.double(), want, 1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_result_does_not_depend_on_the_block_size(name):
    blockwise, dense, make_inputs = CASES[name]
    inputs = [x.double() for x in make_inputs()]
    want_loss, want_grads = _gradients(dense, inputs)
    for block_size in BLOCK_SIZES:
        loss, grads = _gradients(blockwise(block_size), inputs)
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
        for got, want in zip(grads, want_grads):
            assert_relative_close(got, want, 1e-12)


@pytest.mark.parametrize("block_size", [0, 5])
def test_a_queue_without_gradient_gives_the_queries_the_same_gradient(block_size):
    # MoCo: the negatives (a queue) need no gradient, so backward skips their matmul.
    q, k, queue = _random(12, 8, seed=34), _random(12, 8, seed=35), _random(20, 8, seed=36)
    _, (want,) = _gradients(lambda x: info_nce(x, k, queue.double(), 0.1, block_size=block_size),
                            [q.double()])
    _, (got, queue_grad) = _gradients(
        lambda x, negatives: info_nce(x, k, negatives, 0.1, block_size=block_size), [q, queue])
    _, (got_without,) = _gradients(
        lambda x: info_nce(x, k, queue, 0.1, block_size=block_size), [q])
    assert_relative_close(got.double(), want, 1e-5)
    assert torch.equal(got, got_without) and queue_grad.abs().max() > 0


def test_the_function_passes_float64_gradcheck_in_anchors_keys_and_extra_logit():
    anchors, keys = _random(7, 3, seed=10, dtype=torch.float64), _random(9, 3, seed=11,
                                                                         dtype=torch.float64)
    extra = _random(7, seed=12, dtype=torch.float64)
    excluded = torch.tensor([0, 8, 3, 3, 5, 1, 7])
    for block_size in (0, 2, 4):
        def lse(a, k, e):
            return contrastive_logsumexp(a, k, 0.7, excluded, e, block_size=block_size)
        assert torch.autograd.gradcheck(lse, _leaves(anchors, keys, extra))


@pytest.mark.parametrize("block_size", [0, 3])
def test_losses_pass_float64_gradcheck_with_tiles_that_do_not_divide_the_batch(block_size):
    a, b, c = (_random(4, 3, seed=s, dtype=torch.float64) for s in (13, 14, 15))
    negatives = _random(5, 3, seed=16, dtype=torch.float64)
    features = _random(4, 2, 3, seed=17, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2])
    checks = [
        (lambda x, y: nt_xent(x, y, 0.5, block_size=block_size), (a, b)),
        (lambda x, y: info_nce(x, y, None, 0.3, block_size=block_size), (a, c)),
        (lambda x, y, z: info_nce(x, y, z, 0.3, block_size=block_size), (a, b, negatives)),
        (lambda f: supcon(f, labels, 0.3, block_size=block_size), (features,)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, _leaves(*inputs))


# ---- negatives gathered from all processes -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_size", [0, 5])
def test_nt_xent_on_the_second_of_two_processes_gives_its_anchors_loss_and_all_gradients(
        monkeypatch, block_size, dtype):
    z1, z2 = _leaves(_random(8, 6, seed=18, dtype=dtype), _random(8, 6, seed=19, dtype=dtype))
    fake = FakeSecondOfTwoProcesses(monkeypatch, importlib.import_module("selfsup.losses.nt_xent"),
                            [F.normalize(z1[:4], dim=-1), F.normalize(z2[:4], dim=-1)])
    loss = nt_xent(z1[4:], z2[4:], 0.3, gather_distributed=True, block_size=block_size)
    grads = torch.autograd.grad(loss, (z1, z2))
    assert not fake.parts
    reference = _leaves(z1.double(), z2.double())
    want = dense_nt_xent(*reference, 0.3, anchor_samples=range(4, 8))
    want_grads = torch.autograd.grad(want, reference)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6 if dtype == torch.float32 else 1e-12)
    for got, expected in zip(grads, want_grads):
        assert expected[:4].abs().max() > 0  # rank 0's views get gradient, through the keys only
        assert_relative_close(got.double(), expected, 1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("block_size", [0, 3])
def test_in_batch_info_nce_on_the_second_of_two_processes_gives_the_keys_their_gradient(
        monkeypatch, block_size):
    q, k = _leaves(_random(10, 4, seed=20, dtype=torch.float64),
                   _random(10, 4, seed=21, dtype=torch.float64))
    fake = FakeSecondOfTwoProcesses(monkeypatch, importlib.import_module("selfsup.losses.info_nce"),
                            [F.normalize(k[:5], dim=-1)])
    loss = info_nce(q[5:], k[5:], None, 0.2, gather_distributed=True, block_size=block_size)
    grads = torch.autograd.grad(loss, (q, k))
    assert not fake.parts
    reference = _leaves(q, k)
    want = dense_info_nce(*reference, None, 0.2, anchor_rows=torch.arange(5, 10))
    want_grads = torch.autograd.grad(want, reference)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert want_grads[1][:5].abs().max() > 0
    for got, expected in zip(grads, want_grads):
        assert_relative_close(got, expected, 1e-12)


@pytest.mark.parametrize("block_size", [0, 5])
def test_supcon_on_the_second_of_two_processes_gives_rank_zeros_features_their_gradient(
        monkeypatch, block_size):
    (features,) = _leaves(_random(8, 2, 3, seed=22, dtype=torch.float64))
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 0, 2])
    fake = FakeSecondOfTwoProcesses(monkeypatch, importlib.import_module("selfsup.losses.supcon"),
                            [F.normalize(features[:4], dim=-1), labels[:4]])
    loss = supcon(features[4:], labels[4:], 0.5, gather_distributed=True, block_size=block_size)
    (grad,) = torch.autograd.grad(loss, features)
    assert not fake.parts
    (reference,) = _leaves(features)
    want = dense_supcon(reference, labels, 0.5, anchor_samples=range(4, 8))
    (want_grad,) = torch.autograd.grad(want, reference)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert want_grad[:4].abs().max() > 0
    assert_relative_close(grad, want_grad, 1e-12)


def test_gather_distributed_in_one_process_changes_nothing():
    z1, z2 = _random(9, 5, seed=23), _random(9, 5, seed=24)
    for fn in (lambda g: nt_xent(z1, z2, gather_distributed=g, block_size=4),
               lambda g: info_nce(z1, z2, gather_distributed=g, block_size=4),
               lambda g: supcon(torch.stack([z1, z2], 1), gather_distributed=g, block_size=4)):
        assert fn(True).item() == fn(False).item()


# ---- degenerate inputs, bfloat16, autocast -----------------------------------------------------

def _degenerate(case, dtype):
    base = _random(8, 16, seed=25)
    return {"identical": base[:1].repeat(8, 1), "zeros": torch.zeros(8, 16),
            "huge": base * 1e30}[case].to(dtype)


DEGENERATE_LOSSES = {
    "nt_xent": lambda z: nt_xent(z, z.flip(0), 0.1, block_size=3),
    "info_nce_in_batch": lambda z: info_nce(z, z.flip(0), None, 0.07, block_size=3),
    "info_nce_negative_keys": lambda z: info_nce(z, z.flip(0), z.roll(1, 0), 0.07, block_size=3),
    "supcon": lambda z: supcon(torch.stack([z, z.flip(0)], 1), torch.arange(8) % 3, 0.1,
                               block_size=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["identical", "zeros", "huge"])
@pytest.mark.parametrize("name", sorted(DEGENERATE_LOSSES))
def test_blockwise_loss_and_gradient_stay_finite_on_degenerate_embeddings(name, case, dtype):
    (z,) = _leaves(_degenerate(case, dtype))
    loss = DEGENERATE_LOSSES[name](z)
    loss.backward()
    assert loss.dtype == dtype
    assert torch.isfinite(loss).item()
    assert torch.isfinite(z.grad).all().item()


def test_an_anchor_with_nothing_to_contrast_gives_minus_infinity_and_a_zero_gradient():
    # One key, which is each anchor's own: SupCon's one-sample, one-view batch.
    anchors, keys = _leaves(_random(2, 3, seed=26), _random(1, 3, seed=27))
    lse = contrastive_logsumexp(anchors, keys, 0.1, excluded_key=torch.tensor([0, 0]))
    assert lse.tolist() == [float("-inf")] * 2
    torch.where(torch.isfinite(lse), lse, 0.0).sum().backward()
    assert anchors.grad.abs().max() == 0 and keys.grad.abs().max() == 0


def test_bfloat16_inputs_accumulate_in_float32_even_under_autocast():
    anchors, keys = _random(20, 8, seed=28).bfloat16(), _random(30, 8, seed=29).bfloat16()
    want = torch.logsumexp(anchors.float() @ keys.float().T / 0.1, dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_logsumexp(anchors, keys, 0.1, block_size=7)
        from_float32 = contrastive_logsumexp(anchors.float(), keys.float(), 0.1, block_size=7)
    assert got.dtype == from_float32.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_float32, want, rtol=1e-6, atol=1e-6)


# ---- memory: what the graph keeps, and the automatic tile ---------------------------------------

@pytest.mark.parametrize("block_size", [128, 0])
def test_the_autograd_graph_keeps_no_anchor_by_key_matrix(block_size):
    n, dim = 256, 8  # the 2N x 2N logits would have 262,144 entries; the inputs have 2,048
    z1, z2 = _leaves(_random(n, dim, seed=30), _random(n, dim, seed=31))
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = [nt_xent(z1, z2, block_size=block_size),
                  info_nce(z1, z2, block_size=block_size),
                  info_nce(z1, z2, z2.roll(1, 0), block_size=block_size),
                  supcon(torch.stack([z1, z2], 1), torch.arange(n) % 10, block_size=block_size)]
    assert sizes and max(sizes) <= 2 * n * dim
    sum(losses).backward()
    assert torch.isfinite(z1.grad).all()


def test_automatic_tile_is_one_tile_for_small_batches_and_bounded_for_large_ones():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_block_size(512, 512, None, cpu) == 512
    assert resolve_block_size(65536, 65536, None, cpu) == CPU_BLOCK
    assert resolve_block_size(8192, 8192, None, cuda) == 8192  # 256 MiB of float32 logits
    assert resolve_block_size(65536, 65536, None, cuda) ** 2 * 4 <= 256 * 2**20
    assert resolve_block_size(65536, 100, 0, cpu) == 65536
    assert resolve_block_size(65536, 100, 7, cpu) == 7
    with pytest.raises(ValueError):
        resolve_block_size(8, 8, -1, cpu)


def test_module_forms_pass_the_block_size_on():
    z1, z2 = _random(6, 4, seed=32), _random(6, 4, seed=33)
    assert NTXentLoss(0.5, block_size=4)(z1, z2).item() == nt_xent(z1, z2, 0.5, block_size=4).item()
    assert InfoNCELoss(0.1, block_size=4)(z1, z2).item() == info_nce(z1, z2, None, 0.1,
                                                                     block_size=4).item()
    features = torch.stack([z1, z2], 1)
    assert SupConLoss(0.1, block_size=4)(features).item() == supcon(features, None, 0.1,
                                                                    block_size=4).item()
