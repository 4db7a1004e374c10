"""Backbones, optimizers and schedules, and the evaluation protocols."""

import math

import pytest
import torch
import torchvision

from selfsup.backbones import build_backbone
from selfsup.config import OptimConfig
from selfsup.errors import ConfigError
from selfsup.evaluate import knn_predict, linear_probe
from selfsup.heads import ProjectionMLP
from selfsup.optim import (LARS, WarmupCosine, build_optimizer, scaled_learning_rate,
                           schedule_weight_decay)


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnets_at_width_one_are_torchvisions_networks_without_the_classifier(name, dim):
    backbone, feature_dim = build_backbone(name)
    assert feature_dim == dim
    reference = getattr(torchvision.models, name)(weights=None)
    reference_state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert backbone.state_dict().keys() == reference_state.keys()
    backbone.load_state_dict(reference_state)
    reference.fc = torch.nn.Identity()
    backbone.eval(), reference.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(backbone(x), reference(x), atol=1e-5)


def test_cifar_stem_is_a_3x3_stride_1_conv_without_max_pool():
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    features = {}
    backbone.layer1.register_forward_hook(lambda m, i, o: features.setdefault("layer1", o))
    backbone(torch.randn(2, 3, 32, 32))
    assert features["layer1"].shape[-1] == 32  # full resolution reaches layer1


def test_width_multiplier_shrinks_channels_and_feature_dim():
    small, small_dim = build_backbone("resnet18", cifar_stem=True, width=0.25)
    full, full_dim = build_backbone("resnet18", cifar_stem=True)
    assert (small_dim, full_dim) == (128, 512)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters()) / 10
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_any_timm_model_name_is_a_backbone_when_timm_is_installed():
    pytest.importorskip("timm")
    backbone, feature_dim = build_backbone("resnet10t")
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, feature_dim)


def test_unknown_backbone_name_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="resnet19"):
        build_backbone("resnet19")


def test_projection_mlp_has_the_simclr_and_moco_v2_shapes():
    simclr = ProjectionMLP(512, 512, 128, batch_norm=True)
    moco = ProjectionMLP(512, 512, 128, batch_norm=False)
    assert [type(m).__name__ for m in simclr] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in moco] == ["Linear", "ReLU", "Linear"]
    assert simclr(torch.randn(4, 512)).shape == (4, 128)


def test_warmup_then_cosine_schedule():
    schedule = WarmupCosine(warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)


def test_learning_rate_scales_with_the_global_batch():
    config = OptimConfig(lr=0.3, lr_scaling="linear")
    assert scaled_learning_rate(config, 1024) == pytest.approx(1.2)
    config = OptimConfig(lr=1.2, lr_scaling="sqrt")
    assert scaled_learning_rate(config, 64) == pytest.approx(0.075 * 8)


def test_lars_scales_each_update_by_the_trust_ratio_and_skips_excluded_groups():
    weight = torch.nn.Parameter(torch.full((4,), 2.0))
    bias = torch.nn.Parameter(torch.full((4,), 2.0))
    optimizer = LARS([{"params": [weight]}, {"params": [bias], "lars_exclude": True}],
                     lr=1.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.01)
    weight.grad = torch.full((4,), 3.0)
    bias.grad = torch.full((4,), 3.0)
    optimizer.step()
    update = torch.full((4,), 3.0 + 0.5 * 2.0)
    trust = 0.01 * 4.0 / update.norm()  # |w| = 4
    assert torch.allclose(weight, 2.0 - trust * update)
    assert torch.allclose(bias, torch.full((4,), 2.0 - 3.0))  # plain SGD, no weight decay


def test_optimizer_excludes_biases_and_norms_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    optimizer = build_optimizer(list(model.named_parameters()),
                                OptimConfig(name="sgd", weight_decay=0.1), 256)
    decays = [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups]
    assert decays == [(1, 0.1), (3, 0.0)]
    assert not any(g["fixed_lr"] for g in optimizer.param_groups)


def test_knn_matches_a_brute_force_weighted_vote():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=generator)
    bank_labels = torch.randint(0, 3, (50,), generator=generator)
    queries = torch.randn(7, 8, generator=generator)
    predictions = knn_predict(bank, bank_labels, queries, num_classes=3, k=5, temperature=0.1)
    for query, prediction in zip(queries, predictions):
        similarity = [float(torch.nn.functional.cosine_similarity(query, b, dim=0)) for b in bank]
        nearest = sorted(range(50), key=lambda i: -similarity[i])[:5]
        votes = [0.0, 0.0, 0.0]
        for i in nearest:
            votes[int(bank_labels[i])] += math.exp(similarity[i] / 0.1)
        assert int(prediction) == max(range(3), key=lambda c: votes[c])


def test_linear_probe_chooses_hyper_parameters_on_validation_never_on_test():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=generator) * 3
    def split(n):
        labels = torch.randint(0, 3, (n,), generator=generator)
        return centers[labels] + torch.randn(n, 16, generator=generator), labels
    train, val, test = split(300), split(100), split(100)
    grid = dict(lrs=[1e-3, 1e-1], weight_decays=[0.0, 1e-2], steps=50)
    clean = linear_probe(train, val, test, 3, **grid)
    scrambled = linear_probe(train, val, (test[0], test[1].roll(1)), 3, **grid)
    assert (clean.lr, clean.weight_decay) == (scrambled.lr, scrambled.weight_decay)
    assert clean.val_top1 == scrambled.val_top1
    assert clean.test_top1 > 0.9


def test_fixed_lr_modules_keep_their_base_learning_rate_under_the_schedule():
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, 3), "predictor": torch.nn.Linear(3, 3)})
    optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(lr=0.1, lr_scaling="none"),
                                256, fixed_lr_prefixes=("predictor",))
    from selfsup.optim import constant_schedule

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [constant_schedule if g["fixed_lr"] else WarmupCosine(0, 10)
                    for g in optimizer.param_groups])
    for _ in range(5):
        optimizer.step()
        schedule.step()
    rates = {g["fixed_lr"]: g["lr"] for g in optimizer.param_groups}
    assert rates[True] == pytest.approx(0.1) and rates[False] == pytest.approx(0.05)


def test_collapse_monitors_tell_a_collapsed_embedding_from_a_healthy_one():
    from selfsup.evaluate.metrics import collapse_metrics

    generator = torch.Generator().manual_seed(0)
    healthy = torch.randn(256, 64, generator=generator)
    collapsed = torch.randn(1, 64, generator=generator).repeat(256, 1) + 1e-6 * healthy
    good, bad = collapse_metrics([healthy, healthy]), collapse_metrics([collapsed, collapsed])
    assert good["embedding_std"] == pytest.approx(1 / 64 ** 0.5, rel=0.1)
    assert bad["embedding_std"] < 1e-3
    assert good["effective_rank"] > 40 and bad["effective_rank"] < 1.01
    assert bad["uniformity"] == pytest.approx(0.0, abs=1e-3)  # every point in the same place
    assert good["alignment"] == pytest.approx(0.0, abs=1e-6)


def test_an_epoch_whose_embeddings_fall_onto_a_few_lines_is_warned_of():
    from selfsup.evaluate.metrics import collapse_metrics, collapse_warning

    generator = torch.Generator().manual_seed(0)
    healthy = torch.randn(128, 64, generator=generator)
    # Two directions, as SimSiam without its stop-gradient collapses onto +-v: rank about 2.
    signs = torch.randint(0, 2, (128, 1), generator=generator) * 2.0 - 1
    collapsed = signs * torch.randn(1, 64, generator=generator) + 0.01 * healthy
    ranks = {name: collapse_metrics([z])["effective_rank"]
             for name, z in (("healthy", healthy), ("collapsed", collapsed))}
    assert collapse_warning([ranks["healthy"]] * 3, 64, epoch=2) is None
    warning = collapse_warning([ranks["collapsed"]] * 3, 64, epoch=2)
    assert warning is not None and warning.startswith("epoch 2: the embeddings look collapsed")
    assert f"averaged {ranks['collapsed']:.1f}" in warning and "train/effective_rank" in warning
    # The epoch's mean decides: one collapsed batch among healthy ones is no collapse.
    assert collapse_warning([ranks["collapsed"]] + [ranks["healthy"]] * 2, 64, epoch=2) is None
    # A batch too small to have a large rank, or an epoch with nothing logged, says nothing.
    assert collapse_warning([ranks["collapsed"]], 16, epoch=2) is None
    assert collapse_warning([], 64, epoch=2) is None


def test_weight_decay_follows_a_cosine_to_weight_decay_end_and_spares_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    config = OptimConfig(name="adamw", weight_decay=0.04, weight_decay_end=0.4)
    optimizer = build_optimizer(list(model.named_parameters()), config, 256)
    for progress, expected in [(0.0, 0.04), (0.5, 0.22), (1.0, 0.4), (0.25, 0.4 - 0.36 * (
            1 + math.cos(math.pi / 4)) / 2)]:
        schedule_weight_decay(optimizer, config, progress)
        decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
        assert decays[0] == 0.0  # biases and norm weights
        assert decays[-1] == pytest.approx(expected, rel=1e-12)
    constant = OptimConfig(weight_decay=1e-4)
    optimizer = build_optimizer(list(model.named_parameters()), constant, 256)
    schedule_weight_decay(optimizer, constant, 0.7)
    assert max(group["weight_decay"] for group in optimizer.param_groups) == 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_gradients_under_cpu_bf16_autocast_stay_right_where_a_stage_starts_at_1x1(
        channels_last):
    # The ImageNet stem on 16-px crops: layer4 starts from a 1x1 map, where the CPU's bf16
    # weight gradient of a stride-2 3x3 convolution is garbage (NaN, or wrong by 1e11).
    torch.manual_seed(0)
    model, _ = build_backbone("resnet18", cifar_stem=False, width=0.25)
    x = torch.randn(64, 3, 16, 16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(64, model.feature_dim)
    gradients = []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = model(x)
        features.float().backward(upstream)
        gradients.append(model.layer4[0].conv1.weight.grad.clone())
        # The stage that starts at 1x1 ran in float32 (the earlier ones in bf16).
        assert features.dtype == torch.float32
    reference, bf16_gradient = gradients
    assert torch.isfinite(bf16_gradient).all()
    # bf16 in the earlier stages moves it by ~30% (batch norm over 64 1x1 maps amplifies their
    # rounding); the garbage was NaN or 1e11 times the reference.
    assert (bf16_gradient - reference).norm() <= 0.5 * reference.norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(4, 3, 64, 64)).dtype == torch.bfloat16  # no 1x1 stage: all bf16
