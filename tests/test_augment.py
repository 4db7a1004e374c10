"""selfsup.augment: each batched op equals torchvision's functional op, sample by sample; the random
parameters follow torchvision's laws, per sample, reproducibly; the recipes hold the papers' settings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop as TorchvisionRandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from selfsup.augment import (
    RECIPES,
    ColorJitter,
    GaussianBlur,
    HorizontalFlip,
    Normalize,
    Pipeline,
    RandomGrayscale,
    RandomResizedCrop,
    Solarize,
    ViewGenerator,
    build_view_generator,
    recipe_names,
)
from selfsup.errors import ConfigError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # These tensors are small: on a loaded machine, intra-op threads mostly wait for each other
    # (measured on 2 shared cores: 14 s with 2 threads, 3 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int = 12, height: int = 32, width: int = 40, seed: int = 0) -> torch.Tensor:
    """Random float images whose first rows hold the pixels where RGB <-> HSV is delicate."""
    g = _generator(seed)
    images = torch.rand(batch, 3, height, width, generator=g)
    # Gray pixels (max == min: hue and saturation undefined).
    images[:, :, 0, :] = torch.rand(batch, 1, width, generator=g)
    # Saturated pixels: every channel 0 or 1 (primaries, secondaries, black, white).
    images[:, :, 1, :] = torch.randint(0, 2, (batch, 3, width), generator=g).float()
    # Ties for the maximum between two channels (r == g, g == b, r == b).
    images[:, 1, 2, :] = images[:, 0, 2, :]
    images[:, 2, 3, :] = images[:, 1, 3, :]
    images[:, 2, 4, :] = images[:, 0, 4, :]
    # Values quantised like decoded uint8 images.
    images[:, :, 5:8, :] = torch.randint(0, 256, (batch, 3, 3, width), generator=g) / 255.0
    return images


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


# --- each op equals torchvision's functional op, applied image by image with the same parameters ---


@pytest.mark.parametrize(
    "image_size, size",
    [((32, 40), (24, 28)), ((32, 40), (48, 36)), ((32, 40), (32, 40)), ((224, 224), (224, 224)), ((224, 224), (96, 96))],
)
def test_random_resized_crop_equals_torchvision_resized_crop(image_size, size):
    images = _images(batch=8, height=image_size[0], width=image_size[1])
    crop = RandomResizedCrop(size, scale=(0.08, 1.0))
    params = crop.sample_params(len(images), *image_size, _generator(1), "cpu")
    ours = crop.apply(images, params)
    expected = torch.stack(
        [
            TF.resized_crop(
                image, int(t), int(l), int(h), int(w), list(size), interpolation=TF.InterpolationMode.BILINEAR,
                antialias=False,
            )
            for image, t, l, h, w in zip(images, params.top, params.left, params.height, params.width)
        ]
    )
    assert ours.shape == (len(images), 3, *size)
    # grid_sample takes coordinates normalised to [-1, 1] and maps them back with
    # (g + 1) / 2 * (side - 1) in float32: the sum g + 1 is rounded to float32's eps (1.2e-7), so a
    # source coordinate moves by up to about side * eps / 2 pixel, and with pixel values in [0, 1]
    # the output by as much. Twice the image side times eps bounds it with room: 1e-5 at 40 px
    # (measured 4e-6), 5e-5 at 224 px (measured 3e-5), a thousandth of a uint8 step.
    tolerance = 2 * max(image_size) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(ours, expected, atol=tolerance, rtol=0)


def test_random_resized_crop_falls_back_to_torchvision_central_crop():
    # No box of 90% of the area with an aspect ratio of 8 to 10 fits in 20 x 50, so every
    # attempt fails for every sample.
    crop = RandomResizedCrop(16, scale=(0.9, 1.0), ratio=(8.0, 10.0))
    params = crop.sample_params(64, 20, 50, _generator(0), "cpu")
    expected = TorchvisionRandomResizedCrop.get_params(torch.zeros(3, 20, 50), [0.9, 1.0], [8.0, 10.0])
    ours = set(zip(params.top.tolist(), params.left.tolist(), params.height.tolist(), params.width.tolist()))
    assert ours == {tuple(expected)}


def test_horizontal_flip_equals_torchvision_per_flipped_sample():
    images = _images()
    flip = HorizontalFlip(p=0.5)
    params = flip.sample_params(len(images), 32, 40, _generator(2), "cpu")
    assert 0 < params.apply.sum() < len(images)
    expected = torch.stack([TF.horizontal_flip(x) if f else x for x, f in zip(images, params.apply)])
    # Exact: a flip only moves values.
    assert torch.equal(flip.apply(images, params), expected)


def _torchvision_jitter(image, order, brightness, contrast, saturation, hue):
    adjust = {
        0: lambda x: TF.adjust_brightness(x, brightness),
        1: lambda x: TF.adjust_contrast(x, contrast),
        2: lambda x: TF.adjust_saturation(x, saturation),
        3: lambda x: TF.adjust_hue(x, hue),
    }
    for op in order:
        image = adjust[op](image)
    return image


@pytest.mark.parametrize("strength", [(0.4, 0.4, 0.4, 0.1), (0.8, 0.8, 0.8, 0.5)])
def test_color_jitter_equals_torchvision_in_each_samples_own_order(strength):
    images = _images(batch=48)
    jitter = ColorJitter(*strength, p=0.8)
    params = jitter.sample_params(len(images), 32, 40, _generator(3), "cpu")
    assert 0 < params.apply.sum() < len(images)
    assert len({tuple(o) for o in params.order.tolist()}) > 10  # many different orders in one batch
    expected = torch.stack(
        [
            _torchvision_jitter(x, o.tolist(), b.item(), c.item(), s.item(), h.item()) if a else x
            for x, a, o, b, c, s, h in zip(
                images, params.apply, params.order, params.brightness, params.contrast,
                params.saturation, params.hue,
            )
        ]
    )
    # 1e-5: the same float32 formulas as torchvision, but the gray mean of the contrast step is
    # reduced over a batch instead of one image (a different summation order, ~1e-7), and the
    # RGB -> HSV -> RGB round trip that follows can amplify such a difference a few times.
    torch.testing.assert_close(jitter.apply(images, params), expected, atol=1e-5, rtol=0)


def test_hue_equals_torchvision_on_gray_saturated_and_tied_pixels():
    images = _images(batch=16)
    hue_only = ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.5, p=1.0)
    params = hue_only.sample_params(len(images), 32, 40, _generator(4), "cpu")
    expected = torch.stack([TF.adjust_hue(x, h.item()) for x, h in zip(images, params.hue)])
    ours = hue_only.apply(images, params)
    # 1e-6: the hue itself is torchvision's float32 arithmetic step for step; the way back is
    # torchvision's sector table in closed form (max - range * w for v * (1 - s * f)), which
    # rounds differently by an ulp or two of 1.0 (measured 1.2e-7). Gray pixels stay exactly gray.
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert torch.equal(ours[:, :, 0], images[:, :, 0])


@pytest.mark.parametrize("adjustment", ["brightness", "contrast", "saturation"])
def test_each_blend_adjustment_equals_torchvision(adjustment):
    images = _images()
    strengths = {"brightness": 0, "contrast": 0, "saturation": 0, adjustment: 0.9}
    jitter = ColorJitter(**strengths, hue=0, p=1.0)
    params = jitter.sample_params(len(images), 32, 40, _generator(5), "cpu")
    adjust = getattr(TF, f"adjust_{adjustment}")
    factors = getattr(params, adjustment)
    expected = torch.stack([adjust(x, f.item()) for x, f in zip(images, factors)])
    # 1e-6: the blend is the same float32 expression; the contrast mean is reduced in another order.
    torch.testing.assert_close(jitter.apply(images, params), expected, atol=1e-6, rtol=0)


def test_random_grayscale_equals_torchvision_three_channel_grayscale():
    images = _images()
    gray = RandomGrayscale(p=0.5)
    params = gray.sample_params(len(images), 32, 40, _generator(6), "cpu")
    assert 0 < params.apply.sum() < len(images)
    expected = torch.stack(
        [TF.rgb_to_grayscale(x, num_output_channels=3) if a else x for x, a in zip(images, params.apply)]
    )
    # Exact: the same weighted sum, in the same order.
    assert torch.equal(gray.apply(images, params), expected)


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_gaussian_blur_equals_torchvision_with_each_samples_sigma(kernel_size):
    images = _images()
    blur = GaussianBlur(kernel_size, sigma=(0.1, 2.0), p=0.5)
    params = blur.sample_params(len(images), 32, 40, _generator(7), "cpu")
    assert 0 < params.apply.sum() < len(images)
    expected = torch.stack(
        [
            TF.gaussian_blur(x, [kernel_size, kernel_size], [s.item(), s.item()]) if a else x
            for x, a, s in zip(images, params.apply, params.sigma)
        ]
    )
    # 1e-6: two 1-d passes sum the same products as torchvision's 2-d kernel in another order
    # (float32 rounding ~1e-7 on values in [0, 1]).
    torch.testing.assert_close(blur.apply(images, params), expected, atol=1e-6, rtol=0)


def test_solarize_equals_torchvision_per_solarized_sample():
    images = _images()
    solarize = Solarize(threshold=0.5, p=0.5)
    params = solarize.sample_params(len(images), 32, 40, _generator(8), "cpu")
    assert 0 < params.apply.sum() < len(images)
    expected = torch.stack([TF.solarize(x, 0.5) if a else x for x, a in zip(images, params.apply)])
    # Exact: the same comparison and 1 - x.
    assert torch.equal(solarize.apply(images, params), expected)


def test_normalize_equals_torchvision():
    images = _images()
    normalize = Normalize(CIFAR_MEAN, CIFAR_STD)
    expected = TF.normalize(images, list(CIFAR_MEAN), list(CIFAR_STD))
    # Exact: the same subtraction and division.
    assert torch.equal(normalize(images, _generator(0)), expected)


# --- randomness: reproducible, per sample, with torchvision's laws ---


def _uint8_batch(batch: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=_generator(seed))


def test_same_seed_gives_bitwise_identical_views_and_another_seed_different_ones():
    views = build_view_generator("simclr", 96, CIFAR_MEAN, CIFAR_STD)
    images = _uint8_batch(size=96)
    first = views(images, _generator(123))
    again = views(images, _generator(123))
    other = views(images, _generator(124))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])  # the two views of one call are independent draws


def test_a_batch_of_identical_images_gets_a_different_view_per_sample():
    views = build_view_generator("simclr", 32, CIFAR_MEAN, CIFAR_STD, num_views=1)
    images = _uint8_batch(batch=1).expand(16, -1, -1, -1)
    (view,) = views(images, _generator(0))
    distinct = {tuple(v.flatten().tolist()) for v in view}
    assert len(distinct) == 16


def test_crop_area_and_aspect_ratio_follow_torchvision_get_params():
    n, height, width = 5000, 32, 48
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = RandomResizedCrop(32, scale=scale, ratio=ratio).sample_params(n, height, width, _generator(9), "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        reference = np.array(
            [TorchvisionRandomResizedCrop.get_params(torch.empty(3, height, width), scale, ratio) for _ in range(n)],
            dtype=np.float64,
        )
    top, left, h, w = (t.numpy().astype(np.float64) for t in (ours.top, ours.left, ours.height, ours.width))
    ref_top, ref_left, ref_h, ref_w = reference.T
    assert (h >= 1).all() and (h + top <= height).all() and (w >= 1).all() and (w + left <= width).all()
    # 0.04 is above the KS critical value at level 0.001 for two samples of 5000
    # (1.95 * sqrt(2 / 5000) = 0.039); the seeds are fixed, so the test is deterministic.
    assert _ks_statistic(h * w / (height * width), ref_h * ref_w / (height * width)) < 0.04
    assert _ks_statistic(w / h, ref_w / ref_h) < 0.04
    # Where the box sits: its centre, as a fraction of the image.
    assert _ks_statistic((top + h / 2) / height, (ref_top + ref_h / 2) / height) < 0.04
    assert _ks_statistic((left + w / 2) / width, (ref_left + ref_w / 2) / width) < 0.04


def test_jitter_factors_are_uniform_on_torchvision_ranges_and_orders_uniform():
    n = 20000
    params = ColorJitter(0.4, 0.3, 0.2, 0.1, p=0.8).sample_params(n, 32, 32, _generator(10), "cpu")
    # 0.015 is above the one-sample KS critical value at level 0.001 for 20000 draws
    # (1.95 / sqrt(20000) = 0.0138).
    for factors, (low, high) in [
        (params.brightness, (0.6, 1.4)),
        (params.contrast, (0.7, 1.3)),
        (params.saturation, (0.8, 1.2)),
        (params.hue, (-0.1, 0.1)),
    ]:
        assert low <= factors.min() and factors.max() <= high
        values = np.sort(factors.numpy().astype(np.float64))
        uniform_cdf = (values - low) / (high - low)
        ranks = np.arange(1, n + 1) / n
        assert max(np.abs(ranks - uniform_cdf).max(), np.abs(ranks - 1 / n - uniform_cdf).max()) < 0.015
    assert all(sorted(o) == [0, 1, 2, 3] for o in params.order.tolist())
    # Each of the 24 orders about 1/24 of the time: 0.0417 +- 0.006 is more than 4 standard deviations.
    counts = np.unique(params.order.numpy(), axis=0, return_counts=True)[1] / n
    assert len(counts) == 24 and np.abs(counts - 1 / 24).max() < 0.006


@pytest.mark.parametrize(
    "op, p",
    [
        (HorizontalFlip(p=0.5), 0.5),
        (ColorJitter(p=0.8), 0.8),
        (RandomGrayscale(p=0.2), 0.2),
        (GaussianBlur(3, p=0.5), 0.5),
        (Solarize(p=0.2), 0.2),
    ],
)
def test_random_ops_are_applied_to_about_p_of_the_samples(op, p):
    n = 20000
    fraction = op.sample_params(n, 32, 32, _generator(11), "cpu").apply.float().mean().item()
    # 0.015 is more than 5 standard deviations of the fraction (sqrt(0.25 / 20000) = 0.0035).
    assert abs(fraction - p) < 0.015


def test_blur_sigma_is_drawn_in_its_range():
    sigma = GaussianBlur(9, sigma=(0.1, 2.0)).sample_params(5000, 96, 96, _generator(12), "cpu").sigma
    assert 0.1 <= sigma.min() < 0.15 and 1.95 < sigma.max() <= 2.0


# --- recipes and the view generator ---


def _ops(views: ViewGenerator) -> list[type]:
    return [type(op) for op in views.groups[0].pipeline]


def test_simclr_blurs_only_from_96_pixels_with_a_kernel_of_a_tenth_of_the_image():
    assert GaussianBlur not in _ops(build_view_generator("simclr", 32, CIFAR_MEAN, CIFAR_STD))
    for size, kernel in [(96, 9), (224, 23)]:
        blurs = [op for op in build_view_generator("simclr", size, CIFAR_MEAN, CIFAR_STD).groups[0].pipeline
                 if isinstance(op, GaussianBlur)]
        assert [(b.kernel_size, b.sigma, b.p) for b in blurs] == [(kernel, (0.1, 2.0), 0.5)]


def test_recipes_hold_the_papers_settings():
    simclr = build_view_generator("simclr", 32, CIFAR_MEAN, CIFAR_STD).groups[0].pipeline.ops
    assert simclr[0] == RandomResizedCrop(32, scale=(0.08, 1.0))
    assert ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8) in simclr and RandomGrayscale(0.2) in simclr
    moco_v2 = build_view_generator("moco_v2", 96, CIFAR_MEAN, CIFAR_STD).groups[0].pipeline.ops
    assert moco_v2[0] == RandomResizedCrop(96, scale=(0.2, 1.0))
    assert ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8) in moco_v2 and GaussianBlur(9, (0.1, 2.0), 0.5) in moco_v2
    assert GaussianBlur not in _ops(build_view_generator("moco_v2", 32, CIFAR_MEAN, CIFAR_STD))
    moco_v1 = build_view_generator("moco_v1", 224, CIFAR_MEAN, CIFAR_STD).groups[0].pipeline.ops
    assert ColorJitter(0.4, 0.4, 0.4, 0.4, p=1.0) in moco_v1 and GaussianBlur not in map(type, moco_v1)
    assert set(recipe_names()) == set(RECIPES) >= {"simclr", "moco_v2", "moco_v1", "eval"}


def test_unknown_recipe_is_a_config_error_naming_it_and_the_known_ones():
    with pytest.raises(ConfigError) as error:
        build_view_generator("simclr_v9", 32, CIFAR_MEAN, CIFAR_STD)
    message = str(error.value)
    assert "simclr_v9" in message and all(name in message for name in recipe_names())


@pytest.mark.parametrize("recipe", ["simclr", "moco_v2", "moco_v1", "byol", "swav", "dino"])
def test_view_generator_returns_float_normalised_views_of_the_image_size(recipe):
    images = _uint8_batch(batch=4, size=40)
    views = build_view_generator(recipe, 32, CIFAR_MEAN, CIFAR_STD, num_views=3)(images, _generator(0))
    assert len(views) == 3
    for view in views:
        # Multi-crop recipes: two 32 px global crops, then a 16 px local one.
        size = 16 if recipe in ("swav", "dino") and view is views[2] else 32
        assert view.shape == (4, 3, size, size) and view.dtype == torch.float32 and torch.isfinite(view).all()
        # Normalised [0, 1] images lie between (0 - mean) / std and (1 - mean) / std.
        low = (0 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
        high = (1 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
        assert (view >= low.view(1, 3, 1, 1) - 1e-6).all() and (view <= high.view(1, 3, 1, 1) + 1e-6).all()


def test_eval_recipe_only_converts_and_normalises():
    images = _uint8_batch(batch=4)
    (view,) = build_view_generator("eval", 32, CIFAR_MEAN, CIFAR_STD, num_views=1)(images)
    expected = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(CIFAR_MEAN), list(CIFAR_STD))
    assert torch.equal(view, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_on_cuda_with_a_cpu_generator_match_the_cpu_views():
    views = build_view_generator("simclr", 96, CIFAR_MEAN, CIFAR_STD)
    images = _uint8_batch(size=96)
    on_cpu = views(images, _generator(5))
    on_cuda = views(images.cuda(), _generator(5))
    for a, b in zip(on_cpu, on_cuda):
        assert b.device.type == "cuda"
        # The random parameters are the same; only rounding differs. CUDA's grid_sample rounds its
        # coordinates differently from the CPU's (each within 2 * 96 * eps = 2.3e-5 px of the exact
        # value, see the crop test), and up to three jitter factors of at most 1.4 can amplify that
        # 1.4^3 = 2.7 times: ~6e-5 in [0, 1], 2.6e-4 after dividing by std ~0.24. 5e-4 leaves room
        # (measured on an H100: 1.5e-4).
        torch.testing.assert_close(b.cpu(), a, atol=5e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe, num_views", [("simclr", 2), ("dino", 6)])
@pytest.mark.parametrize("record_boxes", [False, True])
def test_a_cuda_forward_never_blocks_on_the_host(recipe, num_views, record_boxes):
    views = build_view_generator(recipe, 96, CIFAR_MEAN, CIFAR_STD, num_views=num_views)
    images = _uint8_batch(size=96).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    # First call: constants are copied to the device once.
    views.views_and_boxes(images, generator, record_boxes=record_boxes)
    torch.cuda.set_sync_debug_mode("error")
    try:
        views.views_and_boxes(images, generator, record_boxes=record_boxes)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_ops_reject_invalid_settings():
    with pytest.raises(ValueError):
        GaussianBlur(8)
    with pytest.raises(ValueError):
        HorizontalFlip(p=1.5)
    with pytest.raises(ValueError):
        ColorJitter(hue=0.6)
    assert math.isclose(ColorJitter(brightness=0.4)._ranges[0][0], 0.6)


# --- pipelines: one pass per op for all the copies of a group, identical to op-by-op application ---


def _op_by_op(pipeline: Pipeline, images: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """The pipeline as its definition reads: each op draws its parameters in turn from the same
    stream and is applied on its own (no folding, nothing in place), on the images repeated."""
    g = _generator(seed)
    x = images.repeat(copies, 1, 1, 1)
    for op in pipeline:
        params = op.sample_params(x.shape[0], x.shape[2], x.shape[3], g, "cpu")
        x = op.apply(x, params)
    return x


@pytest.mark.parametrize("recipe, size", [("simclr", 32), ("moco_v2", 96), ("byol", 96), ("swav", 96)])
@pytest.mark.parametrize("cache_block", [None, 5000])
def test_pipeline_equals_its_ops_applied_one_by_one(recipe, size, cache_block, monkeypatch):
    # The pipeline cuts every copy from the original batch, folds the flip into the crop, works in
    # place on its own intermediate batches and, on the CPU, runs slice by slice (5000 floats:
    # a slice of one or two images here); none of it may change a value.
    import selfsup.augment.ops as ops

    if cache_block is not None:
        monkeypatch.setattr(ops, "_CACHE_BLOCK", cache_block)
    images = _uint8_batch(batch=6, size=size).float() / 255
    before = images.clone()
    for group in build_view_generator(recipe, size, CIFAR_MEAN, CIFAR_STD, num_views=3).groups:
        ours = group.pipeline(images, _generator(7), copies=3)
        assert torch.equal(ours, _op_by_op(group.pipeline, images, 3, seed=7))
    assert torch.equal(images, before)  # the caller's batch is left as it was


def test_crop_with_mirror_equals_crop_then_horizontal_flip():
    images = _images(batch=8)
    crop = RandomResizedCrop((24, 28))
    params = crop.sample_params(8, 32, 40, _generator(13), "cpu")
    mirror = HorizontalFlip(p=0.5).sample_params(8, 24, 28, _generator(14), "cpu")
    assert 0 < mirror.apply.sum() < 8
    expected = HorizontalFlip().apply(crop.apply(images, params), mirror)
    # Exact: the flipped crop reads the same source coordinates, right to left.
    assert torch.equal(crop.apply(images, params, mirror.apply), expected)


def test_crop_of_several_boxes_per_image_cuts_box_k_times_b_plus_b_from_image_b():
    images = _images(batch=5)
    crop = RandomResizedCrop(16)
    params = crop.sample_params(15, 32, 40, _generator(15), "cpu")
    expected = crop.apply(images.repeat(3, 1, 1, 1), params)
    assert torch.equal(crop.apply(images, params), expected)
    with pytest.raises(ValueError, match="14 crop boxes"):
        crop.apply(images, crop.sample_params(14, 32, 40, _generator(15), "cpu"))


# --- multi-crop (SwAV, DINO): groups of views of their own size, each one batched pass ---


@pytest.mark.parametrize(
    "recipe, image_size, num_views, local_size",
    [("swav", 224, 8, 96), ("swav", 32, 8, 16), ("dino", 224, 10, 96), ("dino", 32, 4, 16), ("dino", 96, 3, 41)],
)
def test_multi_crop_returns_the_global_crops_first_then_the_local_ones(recipe, image_size, num_views, local_size):
    images = _uint8_batch(batch=3, size=image_size)
    views = build_view_generator(recipe, image_size, CIFAR_MEAN, CIFAR_STD, num_views=num_views)(images, _generator(0))
    sizes = [tuple(v.shape) for v in views]
    assert sizes == [(3, 3, image_size, image_size)] * 2 + [(3, 3, local_size, local_size)] * (num_views - 2)
    assert all(v.is_contiguous() for v in views)


def test_multi_crop_with_two_views_has_no_local_crops_and_fewer_is_a_config_error():
    views = build_view_generator("dino", 96, CIFAR_MEAN, CIFAR_STD, num_views=2)
    assert [g.count for g in views.groups] == [1, 1] and views.num_views == 2
    with pytest.raises(ConfigError, match="num_views must be at least 2"):
        build_view_generator("swav", 96, CIFAR_MEAN, CIFAR_STD, num_views=1)


@pytest.mark.parametrize("recipe", ["swav", "dino"])
def test_multi_crop_views_are_reproducible_and_each_an_independent_draw(recipe):
    views = build_view_generator(recipe, 96, CIFAR_MEAN, CIFAR_STD, num_views=6)
    images = _uint8_batch(batch=4, size=96)
    first, again, other = (views(images, _generator(seed)) for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    # The four local crops of one call are four draws, not one repeated.
    locals_ = first[2:]
    assert all(not torch.equal(locals_[i], locals_[j]) for i in range(4) for j in range(i + 1, 4))


def _crop_of(group) -> RandomResizedCrop:
    return group.pipeline.ops[0]


@pytest.mark.parametrize(
    "recipe, image_size, laws",
    [
        # (output size, crop scale) of each group: the papers' values.
        ("swav", 224, [(224, (0.14, 1.0)), (96, (0.05, 0.14))]),
        ("dino", 224, [(224, (0.4, 1.0)), (224, (0.4, 1.0)), (96, (0.05, 0.4))]),
        ("swav", 32, [(32, (0.14, 1.0)), (16, (0.05, 0.14))]),
    ],
)
def test_each_crop_group_draws_its_boxes_from_torchvision_law_with_its_own_scale(recipe, image_size, laws):
    groups = build_view_generator(recipe, image_size, CIFAR_MEAN, CIFAR_STD, num_views=8).groups
    assert [(_crop_of(g).size, _crop_of(g).scale) for g in groups] == [((s, s), scale) for s, scale in laws]
    n = 4000
    for index, group in enumerate(groups):
        scale = _crop_of(group).scale
        params = _crop_of(group).sample_params(n, image_size, image_size, _generator(20 + index), "cpu")
        area = (params.height * params.width).double().numpy() / image_size**2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(20 + index)
            reference = np.array(
                [TorchvisionRandomResizedCrop.get_params(torch.empty(3, image_size, image_size), scale, [3 / 4, 4 / 3])
                 for _ in range(n)], dtype=np.float64)
        # Rounding the box to whole pixels lets the area stray a little outside the scale range.
        slack = 2.5 / image_size
        assert scale[0] - slack <= area.min() and area.max() <= scale[1] + slack
        # 0.045 is above the KS critical value at level 0.001 for two samples of 4000
        # (1.95 * sqrt(2 / 4000) = 0.0436); the seeds are fixed, so the test is deterministic.
        assert _ks_statistic(area, reference[:, 2] * reference[:, 3] / image_size**2) < 0.045


def test_dino_global_crops_differ_as_in_the_paper_and_local_crops_are_blurred_half_the_time():
    groups = build_view_generator("dino", 224, CIFAR_MEAN, CIFAR_STD, num_views=10).groups
    assert [g.count for g in groups] == [1, 1, 8]
    blur_p = [[op.p for op in g.pipeline if isinstance(op, GaussianBlur)] for g in groups]
    solarize_p = [[op.p for op in g.pipeline if isinstance(op, Solarize)] for g in groups]
    assert blur_p == [[1.0], [0.1], [0.5]] and solarize_p == [[], [0.2], []]
    assert all(ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8) in g.pipeline.ops for g in groups)


def test_swav_uses_colour_distortion_of_strength_one_and_blurs_only_from_96_pixels():
    for size, blur in [(32, []), (224, [(23, 0.5), (9, 0.5)])]:
        groups = build_view_generator("swav", size, CIFAR_MEAN, CIFAR_STD, num_views=8).groups
        assert [g.count for g in groups] == [2, 6]  # both globals share one pipeline: one pass
        assert all(ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8) in g.pipeline.ops for g in groups)
        assert [(op.kernel_size, op.p) for g in groups for op in g.pipeline if isinstance(op, GaussianBlur)] == blur


def test_byol_keeps_its_two_asymmetric_views():
    groups = build_view_generator("byol", 96, CIFAR_MEAN, CIFAR_STD, num_views=2).groups
    assert [g.count for g in groups] == [1, 1]
    assert [[op.p for op in g.pipeline if isinstance(op, GaussianBlur)] for g in groups] == [[1.0], [0.1]]
    assert [[op.p for op in g.pipeline if isinstance(op, Solarize)] for g in groups] == [[], [0.2]]
    assert all(_crop_of(g) == RandomResizedCrop(96, scale=(0.08, 1.0)) for g in groups)


def test_each_view_group_is_computed_as_one_batched_pass_per_op(monkeypatch):
    # Record the batch every op sees: a group of n views must reach each op once, as n * B
    # images, and its crop must read the B original images (not n copies of them).
    seen: list[tuple[str, int]] = []
    for cls in (ColorJitter, RandomGrayscale, GaussianBlur, Solarize, Normalize):
        def spy(self, images, params, _apply=cls.apply, _name=cls.__name__):
            seen.append((_name, images.shape[0]))
            return _apply(self, images, params)
        monkeypatch.setattr(cls, "apply", spy)
        monkeypatch.setattr(cls, "apply_", spy)
    crop_apply = RandomResizedCrop.apply

    def crop_spy(self, images, params, mirror=None):
        seen.append(("RandomResizedCrop", images.shape[0], len(params.top)))
        return crop_apply(self, images, params, mirror)

    monkeypatch.setattr(RandomResizedCrop, "apply", crop_spy)
    build_view_generator("dino", 96, CIFAR_MEAN, CIFAR_STD, num_views=10)(_uint8_batch(batch=4, size=96), _generator(0))
    per_group = [4, 4, 32]  # global 1, global 2, the 8 local crops
    assert [s for s in seen if s[0] == "RandomResizedCrop"] == [("RandomResizedCrop", 4, n) for n in per_group]
    for op in ("ColorJitter", "RandomGrayscale", "GaussianBlur", "Normalize"):
        assert [s[1] for s in seen if s[0] == op] == per_group
    assert [s[1] for s in seen if s[0] == "Solarize"] == [4]


@pytest.mark.parametrize(
    "op", [ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), RandomGrayscale(p=0.5), GaussianBlur(5, p=0.5)], ids=type
)
def test_ops_give_the_same_images_with_or_without_host_reads(op, monkeypatch):
    # On the CPU, ops read which samples they change (and the jitter, how many take each order)
    # and compute just those; an accelerator must not wait for such a read, so there they compute
    # the whole batch and keep each sample's own result. Both must give the same images.
    import selfsup.augment.ops as ops

    images = _images(batch=64)
    params = op.sample_params(len(images), 32, 40, _generator(16), "cpu")
    on_cpu, on_cpu_in_place = op.apply(images, params), op.apply_(images.clone(), params)
    monkeypatch.setattr(ops, "_host_reads_are_free", lambda device: False)
    # Exact: each sample gets the same arithmetic; an identity blend or hue leaves it untouched.
    assert torch.equal(op.apply(images, params), on_cpu)
    assert torch.equal(op.apply_(images.clone(), params), on_cpu)
    assert torch.equal(on_cpu_in_place, on_cpu)


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.5, 0.2), (0.5, 1.5)])
def test_a_crop_scale_outside_zero_to_one_is_refused_naming_it(scale):
    with pytest.raises(ValueError, match=r"crop scale must satisfy 0 < min <= max <= 1, got"):
        RandomResizedCrop(32, scale=scale)
