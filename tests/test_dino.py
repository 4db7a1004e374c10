"""DINO: the loss against a float64 transcription of the paper's Algorithm 1 and eq. 3 (explicit
loops over Python floats, not our implementation), the weight-normalised head, and what the method
centres, schedules, freezes, copies and evaluates."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.backbones import build_backbone
from selfsup.checkpoint import load_checkpoint_file
from selfsup.heads import DINOHead
from selfsup.losses import DINOLoss, dino
from selfsup.methods import (Batch, MethodContext, build_method, get_method_class,
                             method_hyperparameters)

REL = 1e-10


def _random(*shape, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, dtype=torch.float64, generator=generator)


# ---- float64 transcription ---------------------------------------------------------------------

def paper_H(t, s, center, tps, tpt):
    """Algorithm 1's ``H(t, s)``: ``s = softmax(s / tps)``, ``t = softmax((t - C) / tpt)``,
    ``-(t * log(s)).sum(dim=1).mean()``, row by row in Python floats."""
    total = 0.0
    for t_row, s_row in zip(t.tolist(), s.tolist()):
        t_logits = [(x - c) / tpt for x, c in zip(t_row, center)]
        s_logits = [x / tps for x in s_row]
        t_norm = sum(math.exp(x) for x in t_logits)
        s_norm = sum(math.exp(x) for x in s_logits)
        total -= sum(math.exp(a) / t_norm * math.log(math.exp(b) / s_norm)
                     for a, b in zip(t_logits, s_logits))
    return total / len(t)


def paper_dino_loss(student, teacher, center, tps, tpt):
    """Eq. 3: H(P_t(x), P_s(x')) over the global crops x and every other crop x', averaged over
    the pairs (the reference's DINOLoss). With two crops this is Algorithm 1's
    ``H(t1, s2) / 2 + H(t2, s1) / 2``."""
    pairs = [(i, v) for i in range(len(teacher)) for v in range(len(student)) if v != i]
    return sum(paper_H(teacher[i], student[v], center, tps, tpt) for i, v in pairs) / len(pairs)


def paper_center(center, teacher_outputs, m):
    """Algorithm 1: ``C = m * C + (1 - m) * cat([t1, t2]).mean(dim=0)``."""
    rows = [row for t in teacher_outputs for row in t.tolist()]
    return [m * c + (1 - m) * sum(row[k] for row in rows) / len(rows)
            for k, c in enumerate(center)]


# ---- the loss ----------------------------------------------------------------------------------

def test_dino_loss_with_two_crops_equals_algorithm_1_in_float64():
    s1, s2, t1, t2 = (_random(4, 7, seed=s, scale=0.5) for s in range(4))
    center = _random(7, seed=9, scale=0.1)
    expected = (paper_H(t1, s2, center.tolist(), 0.1, 0.04) / 2
                + paper_H(t2, s1, center.tolist(), 0.1, 0.04) / 2)
    loss = dino([s1, s2], [t1, t2], center)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("crops, tps, tpt", [(5, 0.1, 0.04), (3, 0.2, 0.07), (2, 0.1, 0.055)])
def test_dino_multi_crop_loss_equals_equation_3_in_float64(crops, tps, tpt):
    student = [_random(3, 6, seed=10 + v, scale=0.5) for v in range(crops)]
    teacher = [_random(3, 6, seed=20 + i, scale=0.5) for i in range(2)]
    center = _random(1, 6, seed=30, scale=0.1)
    expected = paper_dino_loss(student, teacher, center[0].tolist(), tps, tpt)
    assert dino(student, teacher, center, tps, tpt).item() == pytest.approx(expected, rel=REL)
    assert DINOLoss(tps, tpt)(student, teacher, center).item() == pytest.approx(expected,
                                                                                rel=REL)


def test_dino_loss_sends_gradient_to_the_student_only():
    student = [_random(3, 6, seed=40 + v).requires_grad_() for v in range(3)]
    teacher = [_random(3, 6, seed=50 + i).requires_grad_() for i in range(2)]
    center = _random(6, seed=60).requires_grad_()
    dino(student, teacher, center).backward()
    assert all(torch.count_nonzero(s.grad) > 0 for s in student)
    assert all(t.grad is None for t in teacher) and center.grad is None


def test_dino_loss_on_bfloat16_logits_under_autocast_is_float32_finite_and_close_to_float32():
    # Logits of the size a weight-normalised head gives (|g_t| <= 1), divided by 0.04.
    student = [_random(16, 512, seed=70 + v, scale=0.3).bfloat16() for v in range(4)]
    teacher = [_random(16, 512, seed=80 + i, scale=0.3).bfloat16() for i in range(2)]
    center = _random(512, seed=90, scale=0.05).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino(student, teacher, center)
    reference = dino([s.float() for s in student], [t.float() for t in teacher], center)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_dino_loss_rejects_crop_counts_it_cannot_pair():
    logits = [_random(2, 4, seed=100 + v) for v in range(3)]
    center = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one teacher crop"):
        dino(logits, [], center)
    with pytest.raises(ValueError, match="3 teacher and 2 student"):
        dino(logits[:2], logits, center)
    with pytest.raises(ValueError, match="at least 2 crops"):
        dino(logits[:1], logits[:1], center)


# ---- the head ----------------------------------------------------------------------------------

def test_dino_head_is_a_gelu_mlp_to_a_normalised_bottleneck_then_a_weight_normalised_layer():
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    assert head.last_layer.bias is None
    x = torch.randn(5, 12)
    bottleneck = nn.functional.normalize(head.mlp(x), dim=-1)
    weight = head.last_layer.weight
    # g = 1: every output row of the last layer is a unit vector, and so is the bottleneck.
    assert torch.allclose(weight.norm(dim=1), torch.ones(20), atol=1e-6)
    assert torch.allclose(head(x), bottleneck @ weight.T, atol=1e-6)
    assert head(x).abs().max() <= 1 + 1e-6
    assert len([m for m in DINOHead(12, 20, 16, 8, num_layers=1).mlp
                if isinstance(m, nn.Linear)]) == 1


def test_dino_head_with_use_bn_normalises_each_hidden_layer_before_its_gelu():
    # The reference's --use_bn_in_head: Linear, BatchNorm1d, GELU per hidden layer; the layer to
    # the bottleneck has none.
    head = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, use_bn=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    head.train()
    hidden = head.mlp[:2](torch.randn(32, 12) * 5 + 3)
    assert torch.allclose(hidden.mean(dim=0), torch.zeros(16), atol=1e-5)


def test_dino_head_keeps_g_at_one_when_the_last_layer_is_normalised():
    head = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    magnitude = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    assert not magnitude.requires_grad and direction.requires_grad
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
    assert torch.equal(magnitude, torch.ones(10, 1))
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    free = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_dino_head_state_dict_restores_it_exactly_and_a_deep_copy_is_independent():
    torch.manual_seed(1)
    head = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.mul_(1.5)
    torch.manual_seed(2)
    restored = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    restored.load_state_dict(head.state_dict())
    x = torch.randn(3, 6)
    assert torch.equal(restored(x), head(x))
    copied = copy.deepcopy(head)
    assert torch.equal(copied(x), head(x))
    with torch.no_grad():
        copied.last_layer.parametrizations.weight.original1.add_(1.0)
    assert not torch.equal(copied(x), head(x))


def test_dino_head_computes_in_float32_under_bfloat16_autocast():
    head = DINOHead(6, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, head(x.bfloat16().float()), rtol=0, atol=1e-6)


# ---- the method --------------------------------------------------------------------------------

def _conv_backbone(feature_dim: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, feature_dim))


SMALL = {"out_dim": 12, "hidden_dim": 16, "bottleneck_dim": 8, "num_local_crops": 2}


def _dino(backbone=None, feature_dim=16, **overrides):
    torch.manual_seed(0)
    context = MethodContext(feature_dim=feature_dim, num_samples=64, num_classes=10,
                            image_size=8)
    return build_method("dino", backbone or _conv_backbone(feature_dim), context,
                        {**SMALL, **overrides})


def _views(seed, batch=4, local=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, 8, 8, generator=generator, dtype=dtype) for _ in range(2)]
            + [torch.randn(batch, 3, 4, 4, generator=generator, dtype=dtype)
               for _ in range(local)])


def _batch(views, epoch=0.0):
    return Batch(list(views), None, torch.arange(views[0].shape[0]), torch.Generator(), epoch)


def _move_student(method, scale=0.1):
    with torch.no_grad():
        for p in method.student.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def test_dino_defaults_are_the_papers():
    assert method_hyperparameters("dino") == {
        "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "num_layers": 3,
        "norm_last_layer": True, "use_bn_in_head": False, "num_local_crops": 10,
        "student_temperature": 0.1,
        "teacher_temperature": 0.07, "warmup_teacher_temperature": 0.04,
        "warmup_teacher_temperature_epochs": 30, "center_momentum": 0.9,
        "base_momentum": 0.996, "freeze_last_layer_epochs": 1.0, "clip_grad": 3.0}
    cls = get_method_class("dino")
    assert cls.default_optimizer == {"name": "adamw", "lr": 5e-4, "lr_scaling": "linear",
                                     "weight_decay": 0.04, "weight_decay_end": 0.4,
                                     "warmup_epochs": 10}
    assert cls.views == "dino"
    assert _dino(num_local_crops=6).num_views == 8


def test_dino_evaluates_the_teachers_backbone_not_the_students():
    method = _dino()
    assert method.backbone is method.teacher.module[0]
    assert method.backbone is not method.student[0]
    assert not any(p.requires_grad for p in method.backbone.parameters())
    _move_student(method)
    x = torch.randn(3, 3, 8, 8)
    method.eval()
    assert not torch.equal(method.backbone(x), method.student[0](x))


def test_dino_step_loss_equals_equation_3_with_the_previous_centre_and_scheduled_temperature():
    method = _dino().double()
    _move_student(method)
    with torch.no_grad():
        method.center.copy_(_random(1, 12, seed=110, scale=0.1))
    old_center = method.center[0].tolist()
    views = _views(111, dtype=torch.float64)
    epoch = 10.0
    loss = method.training_step(_batch(views, epoch)).loss
    with torch.no_grad():  # BatchNorm: crops of one size go through the backbone together
        student = [*method.student(torch.cat(views[:2])).split(4),
                   *method.student(torch.cat(views[2:])).split(4)]
        teacher = method.teacher(torch.cat(views[:2])).split(4)
    tpt = 0.04 + (0.07 - 0.04) * 10 / 29
    expected = paper_dino_loss(student, teacher, old_center, 0.1, tpt)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_dino_centre_moves_with_momentum_0_9_towards_the_teachers_global_crop_mean():
    method = _dino().double()
    assert torch.equal(method.center, torch.zeros(1, 12, dtype=torch.float64))
    assert "center" in method.state_dict()
    for step in range(2):
        views = _views(120 + step, dtype=torch.float64)
        before = method.center[0].tolist()
        with torch.no_grad():
            teacher = method.teacher(torch.cat(views[:2])).split(4)
        method.training_step(_batch(views))
        expected = paper_center(before, teacher, 0.9)
        assert torch.allclose(method.center[0], torch.tensor(expected, dtype=torch.float64),
                              rtol=1e-12, atol=1e-14)


def test_dino_teacher_sees_only_the_global_crops_and_gets_no_gradient():
    method = _dino()
    seen = []
    method.teacher.module[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    output = method.training_step(_batch(_views(130)))
    assert seen == [torch.Size([8, 3, 8, 8])]  # the 2 global crops of 4 images, one pass
    output.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)
    assert output.features.shape == (4, 16) and len(output.embeddings) == 2
    assert set(output.logs) >= {"teacher_entropy", "kl", "center_norm", "teacher_temperature"}
    # Cross-entropy = the teacher's entropy + KL(teacher || student); KL >= 0.
    assert output.logs["kl"] >= 0
    assert output.logs["teacher_entropy"] + output.logs["kl"] == pytest.approx(
        output.loss.item(), rel=1e-6)


def test_dino_teacher_temperature_warms_up_per_epoch_as_the_references_linspace():
    method = _dino()
    schedule = np.concatenate((np.linspace(0.04, 0.07, 30), np.full(70, 0.07)))
    for epoch in (0.0, 0.9, 1.0, 14.5, 29.0, 29.99, 30.0, 99.0):
        assert method.teacher_temperature_at(epoch) == pytest.approx(schedule[int(epoch)],
                                                                     rel=1e-12)
    assert method.teacher_temperature_at(0.0) == 0.04
    assert method.teacher_temperature_at(29.0) == pytest.approx(0.07)
    assert _dino(warmup_teacher_temperature_epochs=0).teacher_temperature_at(0.0) == 0.07
    single = _dino(warmup_teacher_temperature_epochs=1)
    assert (single.teacher_temperature_at(0.5), single.teacher_temperature_at(1.0)) == (0.04, 0.07)
    step = method.training_step(_batch(_views(140), epoch=12.3))
    assert step.logs["teacher_temperature"] == pytest.approx(schedule[12])


@pytest.mark.parametrize("progress, momentum", [(0.0, 0.996), (0.5, 0.998), (1.0, 1.0)])
def test_dino_teacher_follows_the_student_with_momentum_from_0_996_to_1(progress, momentum):
    method = _dino()
    _move_student(method, scale=1.0)
    before = [p.clone() for p in method.teacher.parameters()]
    method.on_after_optimizer_step(progress)
    assert method.momentum == pytest.approx(momentum)
    for teacher, old, student in zip(method.teacher.parameters(), before,
                                     method.student.parameters()):
        assert torch.allclose(teacher, momentum * old + (1 - momentum) * student, atol=1e-6)


def _optimizer_step(method, epoch, seed):
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2, weight_decay=0.04)
    method.training_step(_batch(_views(seed), epoch)).loss.backward()
    method.on_before_optimizer_step(epoch)
    optimizer.step()


def test_dino_clips_each_gradient_tensor_to_norm_3_on_its_own_as_the_reference():
    method = _dino(freeze_last_layer_epochs=0.0)
    parameters = [p for p in method.student.parameters() if p.requires_grad]
    big, small = parameters[0], parameters[1]
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    big.grad.fill_(1.0).mul_(10.0 / big.grad.norm())
    small.grad.fill_(1.0).mul_(0.5 / small.grad.norm())
    before_small = small.grad.clone()
    method.on_before_optimizer_step(epoch=2.0)
    # The reference: clip_coef = clip / (norm + 1e-6), applied only when below 1.
    assert big.grad.norm().item() == pytest.approx(3.0 * 10.0 / (10.0 + 1e-6), rel=1e-6)
    assert torch.equal(small.grad, before_small)
    unclipped = _dino(clip_grad=0.0, freeze_last_layer_epochs=0.0)
    first = next(p for p in unclipped.student.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 100.0)
    unclipped.on_before_optimizer_step(epoch=2.0)
    assert torch.equal(first.grad, torch.full_like(first, 100.0))


def test_dino_last_layer_is_frozen_in_the_first_epoch_then_moves():
    method = _dino()
    last_layer = method.student[1].last_layer.parametrizations.weight.original1
    initial = last_layer.detach().clone()
    first_mlp = method.student[1].mlp[0].weight.detach().clone()
    for epoch in (0.0, 0.5, 0.99):
        _optimizer_step(method, epoch, seed=150)
        assert torch.equal(last_layer, initial)
    assert not torch.equal(method.student[1].mlp[0].weight, first_mlp)
    _optimizer_step(method, 1.0, seed=151)
    assert not torch.equal(last_layer, initial)


def test_dino_step_on_a_vit_with_local_crops_under_bfloat16_autocast_is_finite():
    vit, dim = build_backbone("vit_tiny", cifar_stem=True, width=0.125)
    method = _dino(vit, dim)
    generator = torch.Generator().manual_seed(160)
    views = ([torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
             + [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = method.training_step(_batch(views))
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.student.parameters()
               if p.grad is not None)
    assert torch.isfinite(method.center).all()


# ---- configs and the CLI -----------------------------------------------------------------------

def test_dino_cifar10_config_resolves_to_a_small_patch_vit_with_multi_crop():
    from selfsup.config import read_yaml, resolve_config

    config = resolve_config(read_yaml(Path(__file__).resolve().parent.parent / "configs"
                                      / "dino_cifar10.yaml"))
    assert (config.method, config.backbone.name, config.backbone.cifar_stem) == \
        ("dino", "vit_tiny", True)
    assert config.method_args["num_local_crops"] == 6
    assert (config.method_args["warmup_teacher_temperature"],
            config.method_args["teacher_temperature"]) == (0.04, 0.07)
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adamw", 5e-4, 0.04)


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_cli_trains_dino_two_steps_at_tiny_width_with_the_weight_decay_schedule(backbone,
                                                                                tmp_path):
    command = [sys.executable, "-m", "selfsup.cli", "train", "--method", "dino",
               "--backbone", backbone, "--max-steps", "2", "--width", "0.125",
               "--batch-size", "16", "--no-eval", "--num-workers", "0",
               "--out", str(tmp_path / "run"), "--set", "method_args.out_dim=256",
               "--set", "eval.monitor_every_n_epochs=0", "--set", "train.progress_bar=false"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    state = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    # The second (last) step ran at the end of the cosine: 0.4, the paper's final weight decay.
    decays = {group["weight_decay"] for group in state["optimizer_states"][0]["param_groups"]}
    assert sorted(decays) == pytest.approx([0.0, 0.4])
