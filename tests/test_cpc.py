"""CPC v2 (Hénaff et al. 2020): the patch grid, the per-sample normalisation of the encoder, the
causal context network, the loss against a float64 transcription of the paper's InfoNCE (eq. 2),
the patch augmentation, and the evaluated network (pooled patch features)."""

import math

import pytest
import torch
from torch import nn

from selfsup.augment.ops import ColorDrop
from selfsup.backbones import build_backbone
from selfsup.errors import ConfigError
from selfsup.losses import info_nce
from selfsup.methods import Batch, MethodContext, build_method, method_names
from selfsup.methods.cpc import (ContextNetwork, MaskedResidualBlock, extract_patches, grid_side,
                                 per_sample_normalization)


def _cpc(image_size=32, width=0.125, **args):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", cifar_stem=True, width=width)
    args = {"context_dim": 16, "target_dim": 8, **args}
    return build_method("cpc", backbone, MethodContext(dim, 100, 10, image_size), args)


def _images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the patch grid ----------------------------------------------------------------------------

def test_patch_grid_has_the_paper_geometry_at_both_scales():
    assert grid_side(224, 64, 32) == 6  # CPC v2 on 224-px crops
    assert grid_side(256, 64, 32) == 7  # CPC v1 on 256-px images
    assert grid_side(32, 8, 4) == 7     # the CIFAR default


def test_patches_are_the_image_windows_and_overlap_by_half():
    images = _images()
    patches = extract_patches(images, 8, 4)
    assert patches.shape == (2, 7, 7, 3, 8, 8)
    for i in range(7):
        for j in range(7):
            assert torch.equal(patches[:, i, j], images[:, :, 4 * i:4 * i + 8, 4 * j:4 * j + 8])
    # Neighbours share half a patch: the right half of (i, j) is the left half of (i, j + 1).
    assert torch.equal(patches[:, :, :-1, :, :, 4:], patches[:, :, 1:, :, :, :4])
    assert torch.equal(patches[:, :-1, :, :, 4:, :], patches[:, 1:, :, :, :4, :])
    # Non-overlapping patches tile the image exactly.
    tiles = extract_patches(images, 8, 8)
    assert tiles.shape == (2, 4, 4, 3, 8, 8)
    assert torch.equal(tiles.permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32), images)


def test_a_patch_larger_than_the_image_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="method_args.patch_size"):
        extract_patches(_images(), 40, 4)
    with pytest.raises(ConfigError, match="method_args.patch_size"):
        _cpc(patch_size=40)


# ---- per-sample normalisation ------------------------------------------------------------------

def test_encoder_batch_norms_become_per_sample_layer_norms():
    encoder, _ = build_backbone("resnet18", cifar_stem=True, width=0.125)
    encoder = per_sample_normalization(encoder).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
    norms = [m for m in encoder.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 for m in norms)
    # In training mode a patch's features do not depend on the other patches of the batch.
    x = _images(6, 8)
    alone = encoder(x[:1])
    assert torch.allclose(encoder(x)[:1], alone, atol=1e-6)
    x[1:] *= 10
    assert torch.allclose(encoder(x)[:1], alone, atol=1e-6)


def test_a_batch_norm_that_cannot_be_made_per_sample_is_an_error():
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        per_sample_normalization(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


# ---- the context network is causal -------------------------------------------------------------

def _rows_leaking_from_below(network, grid, trials=3):
    """Rows ``i`` whose context changes when only latents of rows > i change."""
    leaking = set()
    base = network(grid)
    for i in range(grid.shape[2] - 1):
        for trial in range(trials):
            changed = grid.clone()
            changed[:, :, i + 1:] = torch.randn(changed[:, :, i + 1:].shape,
                                                generator=torch.Generator().manual_seed(trial))
            if not torch.allclose(network(changed)[:, :, :i + 1], base[:, :, :i + 1],
                                  atol=1e-6, rtol=0):
                leaking.add(i)
    return leaking


def _grid(d=6, rows=7, cols=7, seed=1):
    return torch.randn(2, d, rows, cols, generator=torch.Generator().manual_seed(seed))


def test_context_at_rows_up_to_i_ignores_latents_below_row_i():
    torch.manual_seed(0)
    network = ContextNetwork(6, 8, num_blocks=5)
    assert _rows_leaking_from_below(network, _grid()) == set()


class _BottomPaddedBlock(MaskedResidualBlock):
    """The mask the wrong way round: the 2x1 conv sees the row itself and the row *below*."""

    def forward(self, x):
        h = self.along_row(torch.relu(self.reduce(x)))
        h = torch.relu(self.from_above(nn.functional.pad(h, (0, 0, 0, 1))))
        return x + self.expand(h)


def test_the_causality_check_catches_a_wrong_mask():
    torch.manual_seed(0)
    wrong = nn.Sequential(_BottomPaddedBlock(6, 8), nn.ReLU())
    assert _rows_leaking_from_below(wrong, _grid()) == set(range(6))
    unmasked = nn.Conv2d(6, 6, 3, padding=1)
    assert _rows_leaking_from_below(unmasked, _grid()) == set(range(6))


def test_context_sees_its_own_row_and_rows_above_it():
    torch.manual_seed(0)
    network = ContextNetwork(6, 8, num_blocks=5)
    grid = _grid()
    base = network(grid)
    changed = grid.clone()
    changed[:, :, 2] += 1.0
    moved = (network(changed) - base).abs().amax(dim=(0, 1, 3)) > 1e-6
    # Row 2 reaches its own context and, one row per block, the five rows below it.
    assert moved.tolist() == [False, False, True, True, True, True, True]


def test_whole_pipeline_context_ignores_patches_below_row_i_in_training_mode():
    # Patches -> per-sample-normalised encoder (training mode: batch norm would leak here) ->
    # latent grid -> context network of the top-down direction.
    method = _cpc().train()
    patches = method.backbone.patches(_images())

    def context(p):
        return method.context_networks[0](method.backbone.encode(p))

    base = context(patches)
    for i in range(6):
        changed = patches.clone()
        changed[:, i + 1:] = torch.randn(changed[:, i + 1:].shape)
        after = context(changed)
        assert torch.allclose(after[:, :, :i + 1], base[:, :, :i + 1], atol=1e-5, rtol=0), i
        assert not torch.allclose(after[:, :, i + 1:], base[:, :, i + 1:], atol=1e-5), i


# ---- the loss against the paper's equation -----------------------------------------------------

def _conv1x1(conv, vector):
    """A 1x1 convolution at one position, written out: W v + b."""
    weight = conv.weight.detach()[:, :, 0, 0].tolist()
    bias = conv.bias.detach().tolist()
    return [sum(w * x for w, x in zip(row, vector)) + b for row, b in zip(weight, bias)]


def paper_cpc_loss(latents, context, predictors, target, steps, emb_scale):
    """Hénaff et al. 2020, eq. 2, top-down: for every image b, position (i, j) and step k with
    i + k inside the grid, ẑ = emb_scale * W_k c_{i,j}; the loss of step k is the mean over its
    queries of -log exp(ẑ·t_{b,i+k,j}) / sum over every patch l of the batch exp(ẑ·t_l), with
    targets t = U z; steps are summed."""
    batch, _, rows, cols = latents.shape
    vec = lambda x, b, i, j: [float(v) for v in x[b, :, i, j]]  # noqa: E731
    targets = {(b, i, j): _conv1x1(target, vec(latents, b, i, j))
               for b in range(batch) for i in range(rows) for j in range(cols)}
    total = 0.0
    for k, predictor in zip(steps, predictors):
        terms = []
        for b in range(batch):
            for i in range(rows - k):
                for j in range(cols):
                    z_hat = [emb_scale * v for v in _conv1x1(predictor, vec(context, b, i, j))]
                    score = {key: sum(p * t for p, t in zip(z_hat, value))
                             for key, value in targets.items()}
                    positive = score[(b, i + k, j)]
                    denominator = sum(math.exp(s) for s in score.values())
                    terms.append(-math.log(math.exp(positive) / denominator))
        total += sum(terms) / len(terms)
    return total


@pytest.mark.parametrize("directions", [1, 4])
def test_loss_matches_a_float64_transcription_of_the_paper(directions):
    # A 4x4 grid (8-px patches, stride 8), steps 1 and 2, latents large enough that the scores
    # are far from uniform.
    method = _cpc(patch_size=8, patch_stride=8, steps_to_ignore=0, steps_to_predict=2,
                  directions=directions, emb_scale=0.5).double()
    latents = 3 * torch.randn(2, method.context.feature_dim, 4, 4, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(5))
    expected = []
    for turn, network, predictors in zip(method.turns, method.context_networks,
                                         method.predictors):
        # The other directions are the same task on the grid turned by quarter turns.
        grid = torch.rot90(latents, turn, dims=(2, 3))
        with torch.no_grad():
            context = network(grid)
        expected.append(paper_cpc_loss(grid, context, predictors, method.target, [1, 2], 0.5))
    got = method.cpc_loss(latents)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(sum(expected) / len(expected), rel=1e-10)


def test_default_steps_predict_three_rows_below_only():
    method = _cpc()
    assert method.steps == [3]
    assert len(method.context_networks) == 4 and method.turns == (0, 1, 2, 3)
    assert _cpc(directions=2).turns == (0, 2)


def test_info_nce_cpc_form_counts_the_positive_once():
    # Queries against all keys, the positive among them: equals cross-entropy over all keys.
    q = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keys = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    positive = torch.tensor([0, 3, 3, 8, 5])
    got = info_nce(q, keys[positive], keys, temperature=1.0, normalize=False,
                   positive_index=positive)
    want = torch.nn.functional.cross_entropy(q @ keys.T, positive)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # Without positive_index the positive would be counted twice (once as itself, once as a
    # negative): a different, larger loss.
    twice = info_nce(q, keys[positive], keys, temperature=1.0, normalize=False)
    assert twice.item() > got.item() + 1e-3
    with pytest.raises(ValueError, match="negative_keys"):
        info_nce(q, keys[:5], None, positive_index=positive)


def _degenerate(case, dtype):
    base = torch.randn(8, 16, generator=torch.Generator().manual_seed(38))
    # Unnormalised scores of norms 1e30 would be 1e60, past the float range whatever the
    # algorithm: "large" is the largest scale whose scores fit (|score| ~ 1e6).
    return {"identical": base[:1].repeat(8, 1), "zeros": torch.zeros(8, 16),
            "large": base * 1e3}[case].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["identical", "zeros", "large"])
def test_cpc_form_of_info_nce_stays_finite_on_degenerate_inputs(case, dtype):
    z = _degenerate(case, dtype).requires_grad_(True)
    positive = torch.arange(8).roll(1)
    loss = info_nce(z, z[positive], z, temperature=1.0, normalize=False,
                    positive_index=positive)
    loss.backward()
    assert loss.dtype == dtype
    assert torch.isfinite(loss).item() and torch.isfinite(z.grad).all().item()


# ---- the method --------------------------------------------------------------------------------

def test_training_step_is_finite_and_trains_every_part():
    method = _cpc()
    output = method.training_step(Batch([_images(4)], None, torch.arange(4),
                                        torch.Generator().manual_seed(0)))
    # At init every patch is about equally likely: the loss is near log(number of patches).
    assert torch.isfinite(output.loss)
    assert abs(output.loss.item() - math.log(4 * 49)) < 1.0
    output.loss.backward()
    for name in ["backbone.encoder.conv1.weight", "target.weight",
                 "context_networks.3.blocks.4.from_above.weight", "predictors.2.0.weight"]:
        grad = dict(method.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert output.features.shape == (4, method.context.feature_dim)


def test_backbone_is_the_mean_of_the_encoded_patches():
    method = _cpc().eval()
    images = _images(3)
    encoder = method.backbone.encoder
    with torch.no_grad():
        one_by_one = torch.stack([
            torch.stack([encoder(images[b:b + 1, :, 4 * i:4 * i + 8, 4 * j:4 * j + 8])[0]
                         for i in range(7) for j in range(7)]).mean(0) for b in range(3)])
        assert torch.allclose(method.backbone(images), one_by_one, atol=1e-5)


def test_steps_that_do_not_fit_the_grid_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match="method_args.steps_to_predict"):
        _cpc(steps_to_predict=7)
    with pytest.raises(ConfigError, match="method_args.steps_to_ignore"):
        _cpc(steps_to_ignore=3, steps_to_predict=3)


def test_cpc_is_listed_with_its_recipe():
    from selfsup.augment import recipe_names
    assert "cpc" in method_names() and "cpc" in recipe_names()


# ---- patch augmentation ------------------------------------------------------------------------

def test_color_drop_keeps_one_channel_per_sample():
    images = torch.rand(64, 3, 4, 4) + 0.5
    dropped = ColorDrop(p=1.0)(images, torch.Generator().manual_seed(0))
    kept = (dropped != 0).flatten(2).all(dim=2)
    assert kept.sum(dim=1).tolist() == [1] * 64
    assert torch.equal(dropped[kept], images[kept])
    assert set(kept.float().argmax(dim=1).tolist()) == {0, 1, 2}
    assert torch.equal(ColorDrop(p=0.0)(images, torch.Generator().manual_seed(0)), images)


def test_patches_are_augmented_independently_and_reproducibly():
    method = _cpc()
    patches = method.backbone.patches(_images(2)).reshape(-1, 3, 8, 8)
    first = method.patch_augment(patches, torch.Generator().manual_seed(3))
    again = method.patch_augment(patches, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    # Every patch keeps exactly one of its channels (colour dropping with p = 1).
    zero_channels = (first == 0).flatten(2).all(dim=2).sum(dim=1)
    assert zero_channels.tolist() == [2] * patches.shape[0]
