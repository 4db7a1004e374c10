"""Methods without negatives (BYOL, SimSiam, Barlow Twins): their losses against float64
transcriptions of the papers' equations (explicit loops, not our implementation), Barlow Twins'
scale across processes, the asymmetric BYOL views, what each method trains and keeps, and the
SimSiam collapse without its stop-gradient, seen by the collapse monitors."""

import copy
import importlib
import math

import pytest
from fake_distributed import FakeSecondOfTwoProcesses
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment import GaussianBlur, Solarize, build_view_generator
from selfsup.config import OptimConfig
from selfsup.data import CIFAR10_MEAN, CIFAR10_STD
from selfsup.losses import (BarlowTwinsLoss, NegativeCosineLoss, NormalizedMSELoss, barlow_twins,
                            negative_cosine, normalized_mse)
from selfsup.methods import Batch, MethodContext, build_method, get_method_class
from selfsup.optim import build_optimizer

REL = 1e-10


def _random(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _cosine(u, v):
    dot = sum(float(a) * float(b) for a, b in zip(u, v))
    norms = math.sqrt(sum(float(a) ** 2 for a in u)) * math.sqrt(sum(float(b) ** 2 for b in v))
    return dot / norms


# ---- float64 transcriptions of the papers' equations -------------------------------------------

def paper_negative_cosine(p, z):
    """SimSiam eq. 1, D(p, z) = -p/|p| . z/|z|, averaged over the images."""
    return sum(-_cosine(p[i], z[i]) for i in range(p.shape[0])) / p.shape[0]


def paper_byol_regression(q, z):
    """BYOL eq. 2, |q/|q| - z/|z||^2, averaged over the images."""
    total = 0.0
    for i in range(q.shape[0]):
        q_norm = math.sqrt(sum(float(a) ** 2 for a in q[i]))
        z_norm = math.sqrt(sum(float(b) ** 2 for b in z[i]))
        total += sum((float(a) / q_norm - float(b) / z_norm) ** 2 for a, b in zip(q[i], z[i]))
    return total / q.shape[0]


def paper_barlow_twins(z_a, z_b, lambd):
    """Barlow Twins eq. 1-2 on outputs centred along the batch (the reference code's BatchNorm):
    C_ij = sum_b za_bi zb_bj / (sqrt(sum_b za_bi^2) sqrt(sum_b zb_bj^2));
    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2."""
    n, d = z_a.shape

    def centred(z):
        means = [sum(float(z[b, i]) for b in range(n)) / n for i in range(d)]
        return [[float(z[b, i]) - means[i] for i in range(d)] for b in range(n)]

    a, b_ = centred(z_a), centred(z_b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            numerator = sum(a[b][i] * b_[b][j] for b in range(n))
            c_ij = numerator / (math.sqrt(sum(a[b][i] ** 2 for b in range(n)))
                                * math.sqrt(sum(b_[b][j] ** 2 for b in range(n))))
            loss += (1 - c_ij) ** 2 if i == j else lambd * c_ij ** 2
    return loss


# ---- losses ------------------------------------------------------------------------------------

def test_negative_cosine_equals_simsiam_equation_in_float64():
    p, z = _random(7, 5, seed=0), _random(7, 5, seed=1)
    assert negative_cosine(p, z).item() == pytest.approx(paper_negative_cosine(p, z), rel=REL)
    assert NegativeCosineLoss()(p, z).item() == pytest.approx(paper_negative_cosine(p, z), rel=REL)


def test_negative_cosine_reaches_minus_one_on_aligned_vectors_at_any_scale():
    z = _random(4, 6, seed=2)
    assert negative_cosine(3.0 * z, z).item() == pytest.approx(-1.0, rel=REL)


def test_normalized_mse_equals_byol_equation_in_float64():
    q, z = _random(6, 4, seed=3), _random(6, 4, seed=4)
    assert normalized_mse(q, z).item() == pytest.approx(paper_byol_regression(q, z), rel=REL)
    assert NormalizedMSELoss()(q, z).item() == pytest.approx(paper_byol_regression(q, z), rel=REL)


def test_negative_cosine_leaves_the_stop_gradient_to_the_method():
    p, z = _random(3, 4, seed=5).requires_grad_(), _random(3, 4, seed=6).requires_grad_()
    negative_cosine(p, z).backward()
    assert p.grad is not None and z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_twins_equals_zbontar_equation_in_float64(lambd):
    z_a = _random(9, 4, seed=7) * 3.0 + 1.0  # off-centre, off-scale: the standardisation matters
    z_b = _random(9, 4, seed=8)
    expected = paper_barlow_twins(z_a, z_b, lambd)
    assert barlow_twins(z_a, z_b, lambd, eps=0.0).item() == pytest.approx(expected, rel=REL)
    assert BarlowTwinsLoss(lambd, eps=0.0)(z_a, z_b).item() == pytest.approx(expected, rel=REL)


def test_barlow_twins_default_eps_is_batchnorms_and_stays_close_to_the_equation():
    z_a, z_b = _random(16, 5, seed=9), _random(16, 5, seed=10)
    assert barlow_twins(z_a, z_b).item() == pytest.approx(paper_barlow_twins(z_a, z_b, 5e-3),
                                                          rel=1e-4)


def test_barlow_twins_is_zero_for_identical_decorrelated_views():
    # Centred, orthogonal columns of equal norm: C is the identity, so both terms vanish.
    z = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    assert barlow_twins(z, z, eps=0.0).item() == pytest.approx(0.0, abs=1e-24)
    assert barlow_twins(z, -z, eps=0.0).item() == pytest.approx(3 * 4.0)  # C = -I


def test_barlow_twins_is_finite_with_a_constant_dimension_and_rejects_one_sample():
    z_a, z_b = _random(6, 3, seed=12), _random(6, 3, seed=13)
    z_a[:, 1] = 2.0
    z_a.requires_grad_()
    loss = barlow_twins(z_a, z_b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_a.grad).all()
    with pytest.raises(ValueError):
        barlow_twins(z_a[:1], z_b[:1])


def test_barlow_twins_computes_in_float32_under_bfloat16_autocast():
    z_a, z_b = _random(32, 16, seed=14).float(), _random(32, 16, seed=15).float()
    expected = barlow_twins(z_a.bfloat16().float(), z_b.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = barlow_twins(z_a.bfloat16(), z_b.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_barlow_twins_gather_in_one_process_changes_nothing():
    z_a, z_b = _random(5, 4, seed=16), _random(5, 4, seed=17)
    assert barlow_twins(z_a, z_b, gather_distributed=True).item() == pytest.approx(
        barlow_twins(z_a, z_b).item(), rel=1e-12)


def test_barlow_twins_on_two_processes_equals_the_full_batch_loss_and_gradient(monkeypatch):
    # The DDP scale bug lightly had: statistics or C per process, or C summed over processes,
    # give a loss (and gradient) that changes with the number of processes. Ours must not.
    z_a, z_b = _random(8, 5, seed=18), _random(8, 5, seed=19) + 0.5 * _random(8, 5, seed=18)
    full_a, full_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    full = barlow_twins(full_a, full_b, 5e-3)
    full.backward()

    module = importlib.import_module("selfsup.losses.barlow_twins")
    fake = FakeSecondOfTwoProcesses(monkeypatch, module, [z_a[:4], z_b[:4]])
    local_a, local_b = z_a[4:].clone().requires_grad_(), z_b[4:].clone().requires_grad_()
    loss = barlow_twins(local_a, local_b, 5e-3, gather_distributed=True)
    loss.backward()

    assert not fake.parts  # both halves of rank 0 were gathered
    assert loss.item() == pytest.approx(full.item(), rel=1e-12)
    # The gradient reaching this process's rows is the full-batch gradient of those rows (in
    # DDP the gather's backward sums the P processes' copies and DDP divides by P).
    assert torch.allclose(local_a.grad, full_a.grad[4:], rtol=1e-10, atol=1e-12)
    assert torch.allclose(local_b.grad, full_b.grad[4:], rtol=1e-10, atol=1e-12)


# ---- the byol recipe ---------------------------------------------------------------------------

def _op_types(pipeline):
    return [type(op) for op in pipeline]


def test_byol_views_are_asymmetric_in_blur_and_solarize():
    first, second = build_view_generator("byol", 96, CIFAR10_MEAN, CIFAR10_STD).pipelines
    blur1 = next(op for op in first if isinstance(op, GaussianBlur))
    blur2 = next(op for op in second if isinstance(op, GaussianBlur))
    assert (blur1.p, blur2.p) == (1.0, 0.1)
    assert blur1.sigma == blur2.sigma == (0.1, 2.0)
    assert Solarize not in _op_types(first)
    assert [op.p for op in second if isinstance(op, Solarize)] == [0.2]


def test_byol_views_at_32_px_drop_the_blur_but_keep_the_solarize_asymmetry():
    first, second = build_view_generator("byol", 32, CIFAR10_MEAN, CIFAR10_STD).pipelines
    assert GaussianBlur not in _op_types(first) + _op_types(second)
    assert Solarize not in _op_types(first) and Solarize in _op_types(second)


def test_byol_views_share_crop_flip_jitter_and_grayscale_settings():
    first, second = build_view_generator("byol", 32, CIFAR10_MEAN, CIFAR10_STD).pipelines
    for pipeline in (first, second):
        crop, flip, jitter, gray = list(pipeline)[:4]
        assert crop.scale == (0.08, 1.0) and flip.p == 0.5 and gray.p == 0.2
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, jitter.p) == \
            (0.4, 0.4, 0.2, 0.1, 0.8)


def test_byol_second_view_solarizes_about_a_fifth_of_the_images_and_the_first_none():
    # White images: crop, flip and grayscale leave them white; jitter can only dim them to 0.6 or
    # more (brightness 0.4; contrast, saturation and hue do not change a uniform grey), so only
    # solarize (pixels >= 0.5 -> 1 - x) can push an image below 0.5.
    images = torch.ones(2000, 3, 32, 32)
    first, second = build_view_generator("byol", 32, (0.0,) * 3, (1.0,) * 3)(
        images, torch.Generator().manual_seed(0))
    assert (first.mean(dim=(1, 2, 3)) < 0.5).float().mean().item() == 0.0
    solarized = (second.mean(dim=(1, 2, 3)) < 0.5).float().mean().item()
    assert 0.17 < solarized < 0.23


def test_asymmetric_recipe_cycles_its_pipelines_for_more_views():
    views = build_view_generator("byol", 32, CIFAR10_MEAN, CIFAR10_STD, num_views=3).pipelines
    assert views[0] is views[2] and views[0] is not views[1]


# ---- methods -----------------------------------------------------------------------------------

def _backbone(feature_dim: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, feature_dim))


def _context(feature_dim: int = 16) -> MethodContext:
    return MethodContext(feature_dim=feature_dim, num_samples=64, num_classes=10, image_size=8)


def _batch(x1, x2):
    return Batch([x1, x2], None, torch.arange(x1.shape[0]), torch.Generator())


SMALL = {"byol": {"proj_hidden_dim": 32, "proj_dim": 8, "pred_hidden_dim": 32},
         "simsiam": {"proj_hidden_dim": 32, "proj_dim": 8, "pred_hidden_dim": 4},
         "barlow_twins": {"proj_hidden_dim": 32, "proj_dim": 8}}


@pytest.mark.parametrize("name", ["byol", "simsiam", "barlow_twins"])
def test_step_returns_first_view_features_and_both_views_embeddings(name):
    torch.manual_seed(0)
    method = build_method(name, _backbone(), _context(), SMALL[name])
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    output = method.training_step(_batch(x1, x2))
    assert torch.isfinite(output.loss) and output.loss.ndim == 0
    with torch.no_grad():
        assert torch.allclose(output.features, method.backbone(x1), atol=1e-6)
    assert len(output.embeddings) == 2 and all(e.shape == (6, 8) for e in output.embeddings)


@pytest.mark.parametrize("name, defaults", [
    ("byol", {"proj_hidden_dim": 4096, "proj_dim": 256, "pred_hidden_dim": 4096,
              "base_momentum": 0.99}),
    ("simsiam", {"proj_hidden_dim": 2048, "proj_dim": 2048, "proj_layers": 2,
                 "pred_hidden_dim": 512, "stop_gradient": True}),
    ("barlow_twins", {"proj_hidden_dim": 8192, "proj_dim": 8192, "lambd": 5e-3})])
def test_methods_default_to_the_papers_hyperparameters(name, defaults):
    from selfsup.methods import method_hyperparameters

    assert method_hyperparameters(name) == defaults


def test_paper_optimizers_are_lars_for_byol_and_barlow_twins_and_sgd_for_simsiam():
    for name in ("byol", "barlow_twins"):
        assert get_method_class(name).default_optimizer == {
            "name": "lars", "lr": 0.2, "lr_scaling": "linear", "weight_decay": 1.5e-6,
            "warmup_epochs": 10}
    assert get_method_class("simsiam").default_optimizer == {
        "name": "sgd", "lr": 0.03, "lr_scaling": "linear", "weight_decay": 5e-4, "momentum": 0.9,
        "warmup_epochs": 0}


# ---- BYOL --------------------------------------------------------------------------------------

def _byol(**overrides):
    torch.manual_seed(0)
    return build_method("byol", _backbone(), _context(), {**SMALL["byol"], **overrides})


def test_byol_target_gets_no_gradient_and_the_online_network_does():
    byol = _byol()
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    byol.training_step(_batch(x1, x2)).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in byol.momentum_encoder.parameters())
    for module in (byol.backbone, byol.projector, byol.predictor):
        assert all(p.grad is not None for p in module.parameters())
    assert not any(name.startswith("momentum_encoder.")
                   for name, p in byol.named_parameters() if p.requires_grad)


def test_byol_loss_is_the_symmetric_sum_of_the_two_regressions():
    byol = _byol()
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    loss = byol.training_step(_batch(x1, x2)).loss
    swapped = byol.training_step(_batch(x2, x1)).loss
    assert loss.item() == pytest.approx(swapped.item(), rel=1e-6)
    with torch.no_grad():
        q1 = byol.predictor(byol.projector(byol.backbone(x1)))
        q2 = byol.predictor(byol.projector(byol.backbone(x2)))
        t1, t2 = byol.momentum_encoder(x1), byol.momentum_encoder(x2)
    expected = ((2 - 2 * F.cosine_similarity(q1, t2)).mean()
                + (2 - 2 * F.cosine_similarity(q2, t1)).mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("progress, tau", [(0.0, 0.99), (0.5, 0.995), (1.0, 1.0)])
def test_byol_momentum_follows_the_cosine_schedule_from_base_to_one(progress, tau):
    byol = _byol()
    with torch.no_grad():  # the online network has moved away from the target
        for p in list(byol.backbone.parameters()) + list(byol.projector.parameters()):
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in byol.momentum_encoder.parameters()]
    online = list(byol.backbone.parameters()) + list(byol.projector.parameters())
    byol.on_after_optimizer_step(progress)
    # BYOL: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, xi <- tau xi + (1 - tau) theta
    assert 1 - (1 - 0.99) * (math.cos(math.pi * progress) + 1) / 2 == pytest.approx(tau)
    assert byol.momentum == pytest.approx(tau)
    for target, old, source in zip(byol.momentum_encoder.parameters(), before, online):
        assert torch.allclose(target, tau * old + (1 - tau) * source, atol=1e-6)


def test_byol_base_momentum_is_a_hyperparameter():
    byol = _byol(base_momentum=0.996)
    byol.on_after_optimizer_step(0.0)
    assert byol.momentum == pytest.approx(0.996)


def test_byol_state_dict_holds_the_target_and_restores_it_exactly():
    byol = _byol()
    with torch.no_grad():
        for p in byol.momentum_encoder.parameters():
            p.add_(1.0)
    x = torch.randn(4, 3, 8, 8)
    byol.momentum_encoder(x)  # moves the target's BatchNorm statistics too
    state = byol.state_dict()
    assert any(k.startswith("momentum_encoder.") and "running_mean" in k for k in state)
    restored = _byol()
    restored.load_state_dict(state)
    for key, value in restored.momentum_encoder.state_dict().items():
        assert torch.equal(value, byol.momentum_encoder.state_dict()[key])


def test_byol_evaluates_the_online_backbone_not_the_target():
    byol = _byol()
    target_backbone = byol.momentum_encoder.module[0]
    assert byol.backbone is not target_backbone
    optimizer = torch.optim.SGD(byol.trainable_parameters(), lr=0.5)
    before = copy.deepcopy(byol.backbone.state_dict())
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    byol.training_step(_batch(x1, x2)).loss.backward()
    optimizer.step()
    # The evaluated backbone is the one the optimizer moves.
    assert any(not torch.equal(before[k], v) for k, v in byol.backbone.state_dict().items())


# ---- SimSiam -----------------------------------------------------------------------------------

def _simsiam(**overrides):
    torch.manual_seed(0)
    return build_method("simsiam", _backbone(), _context(), {**SMALL["simsiam"], **overrides})


def test_simsiam_predictor_parameters_land_in_fixed_lr_groups():
    simsiam = _simsiam()
    config = OptimConfig(**get_method_class("simsiam").default_optimizer)
    optimizer = build_optimizer(list(simsiam.named_parameters()), config, 256,
                                simsiam.fixed_lr_modules)
    fixed = {id(p) for g in optimizer.param_groups if g["fixed_lr"] for p in g["params"]}
    assert fixed == {id(p) for p in simsiam.predictor.parameters()}
    assert simsiam.fixed_lr_modules == ("predictor",)


def test_simsiam_loss_is_the_papers_symmetric_loss_with_stop_gradient():
    simsiam = _simsiam()
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    output = simsiam.training_step(_batch(x1, x2))
    output.loss.backward()
    ours = [p.grad.clone() for p in simsiam.backbone.parameters()]

    # Algorithm 1 of Chen & He 2021, from the same weights.
    reference = _simsiam()
    f = nn.Sequential(reference.backbone, reference.projector)
    z1, z2 = f(x1), f(x2)
    p1, p2 = reference.predictor(z1), reference.predictor(z2)
    loss = -(F.cosine_similarity(p1, z2.detach()).mean()
             + F.cosine_similarity(p2, z1.detach()).mean()) / 2
    loss.backward()
    assert output.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for mine, theirs in zip(ours, reference.backbone.parameters()):
        assert torch.allclose(mine, theirs.grad, atol=1e-6)


def test_simsiam_without_stop_gradient_sends_gradient_through_both_branches():
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    grads = {}
    for stop in (True, False):
        simsiam = _simsiam(stop_gradient=stop)
        simsiam.training_step(_batch(x1, x2)).loss.backward()
        grads[stop] = torch.cat([p.grad.flatten() for p in simsiam.backbone.parameters()])
    assert not torch.allclose(grads[True], grads[False])


def test_simsiam_heads_follow_the_paper():
    simsiam = build_method("simsiam", _backbone(512), _context(512), {})
    linears = [m for m in simsiam.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 2048)]
    output_bn = list(simsiam.projector.modules())[-1]
    assert isinstance(output_bn, nn.BatchNorm1d) and not output_bn.affine
    predictor = [m for m in simsiam.predictor.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in predictor] == [(2048, 512), (512, 2048)]
    imagenet = build_method("simsiam", _backbone(), _context(), {"proj_layers": 3})
    assert sum(isinstance(m, nn.Linear) for m in imagenet.projector.modules()) == 3


# ---- Barlow Twins ------------------------------------------------------------------------------

def test_barlow_twins_method_gathers_across_processes(monkeypatch):
    module = importlib.import_module("selfsup.losses.barlow_twins")
    calls = []
    monkeypatch.setattr(module, "gather_with_grad", lambda t: calls.append(t.shape) or t)
    torch.manual_seed(0)
    method = build_method("barlow_twins", _backbone(), _context(), SMALL["barlow_twins"])
    x1, x2 = torch.randn(2, 6, 3, 8, 8)
    output = method.training_step(_batch(x1, x2))
    assert calls == [(6, 8), (6, 8)]
    z1, z2 = output.embeddings
    assert output.loss.item() == pytest.approx(barlow_twins(z1, z2, 5e-3).item(), rel=1e-6)


def test_barlow_twins_projector_has_three_layers_of_the_configured_width():
    method = build_method("barlow_twins", _backbone(), _context(),
                          {"proj_hidden_dim": 64, "proj_dim": 32})
    linears = [m for m in method.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 64), (64, 64), (64, 32)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in method.projector.modules()) == 2


# ---- the collapse of SimSiam without its stop-gradient ------------------------------------------

def _train_simsiam_on_the_sample(stop_gradient: bool, steps: int) -> dict[str, float]:
    from selfsup.backbones import build_backbone
    from selfsup.data.sample import read_sample
    from selfsup.evaluate.metrics import collapse_metrics

    images = torch.from_numpy(read_sample().x_train[:1024].copy())
    # 16 px crops of the 32 px images: a quarter of the compute, the same collapse.
    views = build_view_generator("moco_v2", 16, CIFAR10_MEAN, CIFAR10_STD)
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("resnet18", cifar_stem=True, width=0.125)
    context = MethodContext(feature_dim=feature_dim, num_samples=1024, num_classes=10,
                            image_size=32)
    simsiam = build_method("simsiam", backbone, context,
                           {"proj_hidden_dim": 128, "proj_dim": 128, "pred_hidden_dim": 32,
                            "stop_gradient": stop_gradient})
    optimizer = torch.optim.SGD(simsiam.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(len(images), (64,), generator=generator)
        output = simsiam.training_step(Batch(views(images[index], generator), None, index,
                                             generator))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return {"loss": output.loss.item(), **collapse_metrics(output.embeddings)}


def test_simsiam_without_stop_gradient_collapses_and_the_monitors_show_it():
    healthy = _train_simsiam_on_the_sample(stop_gradient=True, steps=40)
    collapsed = _train_simsiam_on_the_sample(stop_gradient=False, steps=40)
    print(f"with stop-gradient: {healthy}\nwithout: {collapsed}")
    # Without the stop-gradient the loss races towards its minimum, -1 ...
    assert collapsed["loss"] < healthy["loss"] - 0.2
    # ... by collapsing: the embeddings fall onto a line or two (effective rank near 1) ...
    assert collapsed["effective_rank"] < 4 < 10 < healthy["effective_rank"]
    # ... and their per-dimension std falls well below the 1/sqrt(d) that the stop-gradient run
    # keeps. (Not to 0: SimSiam's projector ends in BatchNorm, which keeps every dimension
    # zero-mean across the batch, so the embeddings can collapse onto +-v but not onto one point.)
    assert healthy["embedding_std"] > 0.85 / math.sqrt(128)
    assert collapsed["embedding_std"] < 0.65 * healthy["embedding_std"]
