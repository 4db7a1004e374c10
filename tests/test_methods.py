"""Method contract tests: MoCo v2 against the paper's pseudocode, state in state_dict, configs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError
from selfsup.methods import Batch, MethodContext, build_method, method_names


def _tiny_backbone(feature_dim: int = 16) -> nn.Module:
    # No BatchNorm, so the key shuffle cannot change any key and the pseudocode compares exactly.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, feature_dim))


def _context(feature_dim: int = 16) -> MethodContext:
    return MethodContext(feature_dim=feature_dim, num_samples=64, num_classes=10, image_size=8)


def test_mocov2_step_matches_the_paper_pseudocode_step_by_step():
    torch.manual_seed(0)
    moco = build_method("mocov2", _tiny_backbone(), _context(),
                        {"queue_size": 12, "momentum": 0.9, "temperature": 0.2})
    moco.momentum_encoder.update(nn.Sequential(moco.backbone, moco.projector), 0.0)
    # Make the key encoder differ from the query encoder, as it does after a few steps.
    with torch.no_grad():
        for p in moco.momentum_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    f_q = copy.deepcopy(nn.Sequential(moco.backbone, moco.projector))
    f_k = copy.deepcopy(moco.momentum_encoder.module)
    queue = moco.queue.keys.clone().T  # C x K as in the pseudocode
    optimizer = torch.optim.SGD(moco.trainable_parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(f_q.parameters(), lr=0.5)
    t, m, pointer = 0.2, 0.9, 0

    for step in range(3):
        x_q, x_k = torch.randn(2, 4, 3, 8, 8)
        # --- the pseudocode of He et al. 2020 (Algorithm 1), with normalised q and k ---
        q = F.normalize(f_q(x_q), dim=1)
        k = F.normalize(f_k(x_k), dim=1).detach()
        n, c = q.shape
        l_pos = torch.bmm(q.view(n, 1, c), k.view(n, c, 1)).view(n, 1)
        l_neg = torch.mm(q.view(n, c), queue)
        logits = torch.cat([l_pos, l_neg], dim=1)
        labels = torch.zeros(n, dtype=torch.long)
        reference_loss = nn.CrossEntropyLoss()(logits / t, labels)
        reference_optimizer.zero_grad()
        reference_loss.backward()
        reference_optimizer.step()
        with torch.no_grad():
            for p_k, p_q in zip(f_k.parameters(), f_q.parameters()):
                p_k.mul_(m).add_(p_q, alpha=1 - m)
        # enqueue(queue, k); dequeue(queue): the reference's ring buffer, queue[:, ptr:ptr+N] = k.T
        queue[:, pointer:pointer + n] = k.T
        pointer = (pointer + n) % 12

        # --- our step ---
        generator = torch.Generator().manual_seed(step)
        output = moco.training_step(Batch([x_q, x_k], None, torch.arange(4), generator))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        moco.on_after_optimizer_step(step / 3)

        assert output.loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
        assert torch.allclose(moco.queue.keys, queue.T, atol=1e-6)
        for ours_p, ref_p in zip(moco.momentum_encoder.parameters(), f_k.parameters()):
            assert torch.allclose(ours_p, ref_p, atol=1e-6)
        for ours_p, ref_p in zip(moco.backbone.parameters(), f_q[0].parameters()):
            assert torch.allclose(ours_p, ref_p, atol=1e-6)


def test_mocov2_reads_negatives_before_enqueueing_its_keys():
    torch.manual_seed(1)
    moco = build_method("mocov2", _tiny_backbone(), _context(), {"queue_size": 8})
    before = moco.queue.keys.clone()
    x = torch.randn(4, 3, 8, 8)
    output = moco.training_step(Batch([x, x], None, torch.arange(4), torch.Generator()))
    q = F.normalize(moco.projector(moco.backbone(x)), dim=1)
    k = F.normalize(moco.momentum_encoder(x), dim=1)
    expected = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ before.T], 1) / 0.2,
                               torch.zeros(4, dtype=torch.long))
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(before, moco.queue.keys)


def test_mocov2_keys_carry_no_gradient_and_momentum_encoder_is_frozen():
    moco = build_method("mocov2", _tiny_backbone(), _context(), {"queue_size": 8})
    x = torch.randn(4, 3, 8, 8)
    moco.training_step(Batch([x, x], None, torch.arange(4), torch.Generator())).loss.backward()
    assert all(p.grad is None for p in moco.momentum_encoder.parameters())
    assert all(p.grad is not None for p in moco.backbone.parameters())


def test_mocov2_state_dict_holds_queue_pointer_and_momentum_encoder():
    moco = build_method("mocov2", _tiny_backbone(), _context(), {"queue_size": 8})
    keys = moco.state_dict().keys()
    assert "queue.keys" in keys and "queue.pointer" in keys
    assert any(k.startswith("momentum_encoder.") for k in keys)


def test_queue_wraps_around_when_size_is_not_a_multiple_of_the_batch():
    from selfsup.memory import Queue

    queue = Queue(5, 2)
    for value in range(4):
        queue.push(torch.full((2, 2), float(value)))
    # 8 keys pushed into 5 slots: slots hold the last 5 keys (values 1, 2, 2, 3, 3).
    assert sorted(queue.keys[:, 0].tolist()) == [1.0, 2.0, 2.0, 3.0, 3.0]
    assert queue.pointer.item() == 8 % 5


def test_split_batchnorm_normalises_each_sub_batch_separately():
    from selfsup.distributed import SplitBatchNorm2d

    norm = SplitBatchNorm2d(3, num_splits=2)
    x = torch.randn(8, 3, 4, 4)
    x[1::2] += 10.0  # group 1 (odd samples) is shifted: its own statistics remove the shift
    out = norm(x)
    assert torch.allclose(out[0::2].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out[1::2].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    norm.eval()
    assert torch.allclose(norm(x), F.batch_norm(x, norm.running_mean, norm.running_var,
                                                norm.weight, norm.bias, False, 0.0, norm.eps))


def test_simclr_step_returns_features_of_the_first_view_and_a_finite_loss():
    simclr = build_method("simclr", _tiny_backbone(), _context(), {})
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    output = simclr.training_step(Batch([x1, x2], None, torch.arange(6), torch.Generator()))
    assert torch.isfinite(output.loss)
    assert output.features.shape == (6, 16)


def test_every_method_is_registered_with_a_recipe_and_paper_defaults():
    from selfsup.augment import RECIPES
    from selfsup.methods import get_method_class

    assert {"simclr", "mocov2"} <= set(method_names())
    for name in method_names():
        cls = get_method_class(name)
        assert cls.views in RECIPES
        assert cls.__doc__ and "20" in cls.__doc__  # cites a paper with its year


def test_unknown_or_out_of_range_method_argument_names_the_key():
    with pytest.raises(ConfigError, match="method_args.tau"):
        build_method("simclr", _tiny_backbone(), _context(), {"tau": 0.1})
    with pytest.raises(ConfigError, match="method_args.queue_size"):
        build_method("mocov2", _tiny_backbone(), _context(), {"queue_size": 0})
    with pytest.raises(ConfigError, match="byol_typo"):
        build_method("byol_typo", _tiny_backbone(), _context(), {})
