"""CMC (Tian, Krishnan & Isola 2019): the RGB -> Lab conversion against the CIE formulas, the
per-view encoders and their concatenated evaluation features, the symmetric / full-graph loss
(memory bank with NCE or softmax, and in-batch) against float64 transcriptions of the paper's
equations, the memory banks' momentum update, n = 3 views, and the contract's backbone factory."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment import build_view_generator, rgb_to_lab
from selfsup.augment.ops import HorizontalFlip, Normalize, RandomResizedCrop
from selfsup.config import read_yaml, resolve_config
from selfsup.errors import ConfigError
from selfsup.methods import Batch, MethodContext, build_method, method_hyperparameters
from selfsup.methods.cmc import LAB_RANGES, LabViewEncoders

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


# ---- RGB -> Lab --------------------------------------------------------------------------------

def paper_lab(r, g, b):
    """CIE 1976 L*a*b* of one sRGB colour in [0, 1], in float64, from the standards: the sRGB
    transfer curve (IEC 61966-2-1), the sRGB-to-XYZ matrix, the D65 white of that matrix
    (XYZ of RGB white) and the CIE f with its linear segment below (6/29)^3."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = linear(r), linear(g), linear(b)
    x = 0.412453 * r + 0.357580 * g + 0.180423 * b
    y = 0.212671 * r + 0.715160 * g + 0.072169 * b
    z = 0.019334 * r + 0.119193 * g + 0.950227 * b
    xn, yn, zn = 0.950456, 1.0, 1.088754

    def f(t):
        delta = 6 / 29
        return t ** (1 / 3) if t > delta**3 else t / (3 * delta**2) + 4 / 29

    return (116 * f(y / yn) - 16, 500 * (f(x / xn) - f(y / yn)), 200 * (f(y / yn) - f(z / zn)))


def _lab_of(colours, dtype=torch.float64):
    images = torch.tensor(colours, dtype=dtype)[:, :, None, None]
    return rgb_to_lab(images)[:, :, 0, 0].double()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_rgb_to_lab_equals_the_cie_formulas_in_float64(dtype, tolerance):
    colours = torch.rand(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Dark colours take the linear branches of both the sRGB curve and f.
    colours[:8] *= 0.02
    expected = torch.tensor([paper_lab(*c) for c in colours.tolist()], dtype=torch.float64)
    assert torch.allclose(_lab_of(colours.tolist(), dtype), expected, atol=tolerance, rtol=0)


def test_rgb_to_lab_of_known_colours():
    # Published L*a*b* (D65) of the sRGB primaries and secondaries, to two decimals; the a and
    # b extremes are the numbers the CMC code normalises with (green, magenta, blue, yellow).
    known = {(1, 1, 1): (100.0, 0.0, 0.0), (0, 0, 0): (0.0, 0.0, 0.0),
             (1, 0, 0): (53.24, 80.09, 67.20), (0, 1, 0): (87.73, -86.18, 83.18),
             (0, 0, 1): (32.30, 79.19, -107.86)}
    lab = _lab_of(list(known), torch.float32)
    assert torch.allclose(lab, torch.tensor(list(known.values()), dtype=torch.float64), atol=0.01)
    extremes = _lab_of([(0, 1, 0), (1, 0, 1), (0, 0, 1), (1, 1, 0)], torch.float32)
    (a_low, a_high), (b_low, b_high) = LAB_RANGES[1], LAB_RANGES[2]
    assert extremes[0, 1].item() == pytest.approx(a_low, abs=0.01)
    assert extremes[1, 1].item() == pytest.approx(a_high, abs=0.01)
    assert extremes[2, 2].item() == pytest.approx(b_low, abs=0.01)
    assert extremes[3, 2].item() == pytest.approx(b_high, abs=0.01)


def test_rgb_to_lab_greys_have_no_colour_and_bf16_comes_back_finite_in_float32():
    greys = torch.linspace(0, 1, 11)[:, None, None, None].expand(11, 3, 2, 2)
    lab = rgb_to_lab(greys)
    assert torch.allclose(lab[:, 1:], torch.zeros_like(lab[:, 1:]), atol=1e-4)
    assert torch.all(lab[1:, 0] > lab[:-1, 0])  # lightness rises with grey level
    low = rgb_to_lab(torch.rand(2, 3, 4, 4).to(torch.bfloat16))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


def test_rgb_to_lab_rejects_images_without_three_channels():
    with pytest.raises(ValueError, match="3, H, W"):
        rgb_to_lab(torch.rand(2, 1, 4, 4))


# ---- the method -------------------------------------------------------------------------------

def _tiny_factory(in_channels: int) -> tuple[nn.Module, int]:
    # No BatchNorm: a sample's features do not depend on the rest of the batch.
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6)), 6


def _context(num_samples: int = 32, factory=_tiny_factory) -> MethodContext:
    return MethodContext(feature_dim=6, num_samples=num_samples, num_classes=10, image_size=8,
                         image_mean=MEAN, image_std=STD, backbone_factory=factory)


def _cmc(num_samples: int = 32, **arguments):
    torch.manual_seed(4)
    values = {"num_negatives": 16, "proj_dim": 5, **arguments}
    return build_method("cmc", nn.Identity(), _context(num_samples), values)


def _image(batch: int = 4, seed: int = 0) -> torch.Tensor:
    rgb = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _batch(image, index=None, seed: int = 0) -> Batch:
    index = torch.arange(image.shape[0]) if index is None else index
    return Batch([image], None, index, torch.Generator().manual_seed(seed))


def test_defaults_are_the_authors_code_and_the_recipe_is_crop_and_flip():
    assert method_hyperparameters("cmc") == {
        "view_channels": ("L", "ab"), "objective": "nce", "proj_dim": 128,
        "num_negatives": 16384, "temperature": 0.07, "bank_momentum": 0.5}
    method = build_method("cmc", nn.Identity(), _context(), {})
    assert method.views == "cmc" and method.num_views == 1
    assert all(isinstance(p, nn.Linear) and p.out_features == 128 for p in method.projectors)
    ops = build_view_generator("cmc", 32, MEAN, STD, num_views=1).pipelines[0].ops
    assert [type(op) for op in ops] == [RandomResizedCrop, HorizontalFlip, Normalize]
    assert ops[0] == RandomResizedCrop(32, scale=(0.2, 1.0))


def test_views_are_the_lab_channels_of_the_rgb_image_scaled_to_unit_range():
    method = _cmc(view_channels=["L", "a", "b"])
    image = _image()
    rgb = image * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    lab = rgb_to_lab(rgb)
    views = method.backbone.views(image)
    for channel, (view, (low, high)) in enumerate(zip(views, LAB_RANGES)):
        assert view.shape == (4, 1, 8, 8)
        expected = (lab[:, channel:channel + 1] - (low + high) / 2) / ((high - low) / 2)
        assert torch.allclose(view, expected, atol=1e-5)
        assert view.abs().max() <= 1.0 + 1e-4


def test_each_view_has_its_own_encoder_for_its_channels():
    method = _cmc()
    encoders = method.backbone.encoders
    assert [e[0].in_channels for e in encoders] == [1, 2]
    assert encoders[0][0].weight.data_ptr() != encoders[1][0].weight.data_ptr()


def test_evaluation_backbone_concatenates_the_view_encoders_features():
    method = _cmc()
    image = _image()
    l_view, ab_view = method.backbone.views(image)
    expected = torch.cat([method.backbone.encoders[0](l_view),
                          method.backbone.encoders[1](ab_view)], dim=1)
    assert method.context.feature_dim == 12
    assert torch.allclose(method.backbone(image), expected, atol=1e-6)
    # The step's features (the online probe's input) are the same concatenation.
    output = method.training_step(_batch(image))
    assert torch.allclose(output.features, expected, atol=1e-6)


def test_the_trainer_builds_per_view_resnets_and_sizes_the_probe_to_the_concatenation():
    from selfsup.train import SelfSupervisedModule

    config = resolve_config({"method": "cmc", "backbone": {"width": 0.125},
                             "method_args": {"view_channels": ["L", "a", "b"],
                                             "num_negatives": 8}})
    info = {"image_size": 32, "mean": list(MEAN), "std": list(STD), "num_classes": 10,
            "num_train": 20}
    module = SelfSupervisedModule(config.model_dump(mode="json"), info)
    method = module.method
    assert [e.conv1.in_channels for e in method.backbone.encoders] == [1, 1, 1]
    assert method.context.feature_dim == 3 * 64 == module.probe.in_features
    assert method.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def _paper_pair_losses(embeddings, keys, t, objective, normalizers=None, n=None):
    """Tian et al. eq. 2, per ordered pair (i, j) (anchor view i, contrasted view j), in float64.

    ``keys(j)`` gives, for view j, the positive key of each anchor and the K negatives (with
    the bank: the bank's entries; in-batch: the batch's other view-j embeddings).
    L_contrast = -mean_k log h(z_i^k, pos) / (h(z_i^k, pos) + sum_neg h(z_i^k, neg)), or, for
    NCE (Wu et al. eq. 5-6 on P = h / Z): -log h_pos/(h_pos + K/n) - sum log (K/n)/(P + K/n)."""
    views = len(embeddings)
    losses = {}
    for i in range(views):
        for j in range(views):
            if i == j:
                continue
            total = 0.0
            for k, anchor in enumerate(embeddings[i]):
                positive, negatives = keys(j, k)
                h_pos = math.exp(sum(a * b for a, b in zip(anchor, positive)) / t)
                h_neg = [math.exp(sum(a * b for a, b in zip(anchor, key)) / t)
                         for key in negatives]
                if objective == "nce":
                    z, noise = normalizers[(i, j)], len(negatives) / n
                    total -= math.log((h_pos / z) / (h_pos / z + noise))
                    total -= sum(math.log(noise / (h / z + noise)) for h in h_neg)
                else:
                    total -= math.log(h_pos / (h_pos + sum(h_neg)))
            losses[(i, j)] = total / len(embeddings[i])
    return losses


@pytest.mark.parametrize("views", [["L", "ab"], ["L", "a", "b"]])
def test_in_batch_loss_is_the_full_graph_of_the_papers_equation_in_float64(views):
    method = _cmc(objective="in_batch", view_channels=views, temperature=0.2)
    assert len(method.memory_banks) == 0
    output = method.training_step(_batch(_image(6)))
    z = [e.double().tolist() for e in output.embeddings]

    def keys(j, k):  # the positive is view j of the same image, the rest of the batch negatives
        return z[j][k], [z[j][m] for m in range(len(z[j])) if m != k]

    expected = _paper_pair_losses(z, keys, 0.2, "in_batch")
    assert len(expected) == len(views) * (len(views) - 1)  # every ordered pair
    assert output.loss.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    for (i, j), value in expected.items():
        assert output.logs[f"in_batch_{views[i]}_{views[j]}"].item() == pytest.approx(value,
                                                                                      rel=1e-5)


@pytest.mark.parametrize("objective", ["softmax", "nce"])
@pytest.mark.parametrize("views", [["L", "ab"], ["L", "a", "b"]])
def test_memory_bank_loss_is_the_papers_equation_against_the_other_views_bank(objective, views):
    n, negatives, t = 32, 16, 0.07
    method = _cmc(objective=objective, view_channels=views)
    normalizers = None
    for step in range(2):
        index = torch.arange(4) + 4 * step
        banks = [bank.features.double().clone() for bank in method.memory_banks]
        output = method.training_step(_batch(_image(seed=step), index=index, seed=step))
        # The K negatives: uniform draws from the step's generator, shared by every pair.
        noise = torch.randint(n, (negatives,), generator=torch.Generator().manual_seed(step))
        z = [e.double() for e in output.embeddings]

        def keys(j, k):
            return banks[j][index[k]].tolist(), banks[j][noise].tolist()

        if objective == "nce" and normalizers is None:
            # Z of each pair, once, on the first step: n times the mean of h over the noise.
            normalizers = {}
            for i in range(len(views)):
                for j in range(len(views)):
                    if i != j:
                        h = torch.exp(z[i] @ banks[j][noise].T / t)
                        normalizers[(i, j)] = n * h.mean().item()
        expected = _paper_pair_losses([e.tolist() for e in z], keys, t, objective,
                                      normalizers, n)
        assert output.loss.item() == pytest.approx(sum(expected.values()), rel=1e-5)
        for (i, j), value in expected.items():
            assert output.logs[f"{objective}_{views[i]}_{views[j]}"].item() == pytest.approx(
                value, rel=1e-5)
    if objective == "nce":
        assert torch.allclose(method.normalizers.double(),
                              torch.tensor([normalizers[p] for p in method.pairs],
                                           dtype=torch.float64), rtol=1e-6)


def test_embeddings_are_the_normalised_linear_projections_of_each_views_features():
    method = _cmc()
    image = _image()
    output = method.training_step(_batch(image))
    features = method.backbone.encode(image)
    for projector, feature, embedding in zip(method.projectors, features, output.embeddings):
        assert torch.allclose(embedding, F.normalize(projector(feature), dim=1), atol=1e-6)


@pytest.mark.parametrize("momentum", [0.5, 0.0])
def test_each_views_bank_takes_its_embeddings_with_momentum_at_the_batch_indices_only(momentum):
    method = _cmc(bank_momentum=momentum, view_channels=["L", "a", "b"])
    before = [bank.features.clone() for bank in method.memory_banks]
    index = torch.tensor([3, 9, 17, 30])
    others = torch.ones(32, dtype=torch.bool)
    others[index] = False
    for step in range(2):
        stored = [bank.features[index].clone() for bank in method.memory_banks]
        output = method.training_step(_batch(_image(seed=step), index=index, seed=step))
        for bank, old, previous, z in zip(method.memory_banks, before, stored, output.embeddings):
            # A first write replaces the random start; later ones mix with the momentum.
            kept = momentum if step else 0.0
            expected = F.normalize(kept * previous + (1 - kept) * z.detach(), dim=1)
            assert torch.allclose(bank.features[index], expected, atol=1e-6)
            assert torch.equal(bank.features[others], old[others])


def test_anchors_get_gradient_and_bank_entries_do_not():
    method = _cmc()
    output = method.training_step(_batch(_image()))
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert not any(bank.features.requires_grad for bank in method.memory_banks)


def test_banks_and_normalizers_are_in_state_dict_and_restore_exactly():
    method = _cmc()
    method.training_step(_batch(_image()))
    state = method.state_dict()
    assert {"memory_banks.0.features", "memory_banks.1.features", "normalizers"} <= set(state)
    assert state["memory_banks.0.features"].shape == (32, 5) and (state["normalizers"] > 0).all()
    restored = _cmc()
    restored.load_state_dict(state)
    for ours, theirs in zip(restored.memory_banks, method.memory_banks):
        assert torch.equal(ours.features, theirs.features)
    assert torch.equal(restored.normalizers, method.normalizers)


@pytest.mark.parametrize("objective", ["nce", "softmax", "in_batch"])
@pytest.mark.parametrize("case", ["zeros", "identical"])
def test_step_is_finite_on_degenerate_images_in_fp32_and_bf16(objective, case):
    image = {"zeros": torch.zeros(4, 3, 8, 8), "identical": _image(1).repeat(4, 1, 1, 1)}[case]
    for dtype in (torch.float32, torch.bfloat16):
        method = _cmc(objective=objective)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            output = method.training_step(_batch(image))
        output.loss.backward()
        assert torch.isfinite(output.loss).item(), (objective, case, dtype)
        assert all(torch.isfinite(p.grad).all() for p in method.parameters()
                   if p.grad is not None)


@pytest.mark.parametrize("views,problem", [(["L"], "at least two"), (["L", "x"], "Lab channels"),
                                           (["La", "ab"], "one view only"),
                                           (["L", "aa"], "one view only")])
def test_bad_view_channels_are_config_errors_naming_the_key(views, problem):
    with pytest.raises(ConfigError, match=f"method_args.view_channels.*{problem}"):
        build_method("cmc", nn.Identity(), _context(), {"view_channels": views})


def test_without_a_backbone_factory_the_method_says_what_it_needs():
    context = MethodContext(feature_dim=6, num_samples=8, num_classes=10, image_size=8)
    with pytest.raises(ConfigError, match="backbone factory"):
        build_method("cmc", nn.Identity(), context, {})


def test_lab_view_encoders_refuse_data_without_three_channels():
    with pytest.raises(ConfigError, match="3 channels"):
        LabViewEncoders([nn.Identity()] * 2, [1, 1], ["L", "ab"], (0.5,), (0.2,))


def test_cifar10_config_resolves_to_the_method():
    path = CONFIGS / "cmc_cifar10.yaml"
    config = resolve_config(read_yaml(path), origin=str(path))
    assert config.method == "cmc" and config.backbone.cifar_stem is True
    assert config.method_args["view_channels"] == ("L", "ab")


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_backbones_take_any_number_of_input_channels(name):
    from selfsup.backbones import build_backbone

    for channels in (1, 2):
        model, dim = build_backbone(name, cifar_stem=True, width=0.125, in_channels=channels)
        assert model(torch.randn(2, channels, 32, 32)).shape == (2, dim)
    with pytest.raises(ValueError, match="input channel"):
        build_backbone(name, cifar_stem=True, width=0.125, in_channels=0)
