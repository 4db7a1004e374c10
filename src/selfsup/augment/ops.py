"""Batched augmentation ops with per-sample random parameters.

Each op works on a whole batch of float images ``(B, C, H, W)`` in ``[0, 1]`` that already sits on
the training device, and is split in two halves:

- ``sample_params(batch_size, height, width, generator, device)`` draws one set of parameters per
  sample from an explicit :class:`torch.Generator`, with the law torchvision's transform uses for a
  single image;
- ``apply(images, params)`` is deterministic and equals torchvision's functional op applied image by
  image with the same parameters (the tests check this op by op).

``op(images, generator)`` does both. Nothing loops over samples: a random decision that
torchvision takes with an ``if`` becomes a per-sample mask and a ``torch.where``, and a random
factor becomes a ``(B, 1, 1, 1)`` tensor. Random numbers are drawn on the generator's device and
then moved, so a CPU generator gives the same views on any device, and a CUDA generator on a CUDA
batch needs no transfer.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ColorJitter",
    "ColorJitterParams",
    "CropParams",
    "GaussianBlur",
    "GaussianBlurParams",
    "HorizontalFlip",
    "MaskParams",
    "NoParams",
    "Normalize",
    "Op",
    "Pipeline",
    "RandomGrayscale",
    "RandomResizedCrop",
    "Solarize",
]

P = TypeVar("P")

# ITU-R 601-2 luma, with torchvision's tensor kernels' red weight (0.2989, not 0.299) so that our
# grayscale, contrast and saturation equal theirs.
_LUMA = (0.2989, 0.587, 0.114)

# torchvision's RandomResizedCrop tries 10 boxes before it falls back to a central crop.
_CROP_ATTEMPTS = 10


def _rand(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``U[0, 1)`` numbers drawn on the generator's own device, then moved to ``device``.

    Drawing where the generator lives keeps a seed's views the same whatever the batch's device.
    """
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=dtype).to(device)


def _uniform(
    batch_size: int,
    low: float,
    high: float,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    # Same affine map as torch's ``uniform_(low, high)``, which torchvision's transforms call.
    return _rand((batch_size,), generator, device) * (high - low) + low


def _bernoulli(
    batch_size: int, p: float, generator: torch.Generator | None, device: torch.device | str | None
) -> Tensor:
    # torchvision's ``torch.rand(1) < p``, one draw per sample.
    return _rand((batch_size,), generator, device) < p


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per device: a fresh ``torch.tensor(..., device="cuda")``
    at every call would be a blocking host-to-device copy in the middle of the batch."""
    return torch.tensor(values, dtype=dtype, device=device)


def _per_sample(values: Tensor) -> Tensor:
    """Shape ``(B,)`` values so that they broadcast over ``(B, C, H, W)``."""
    return values.view(-1, 1, 1, 1)


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability p must be in [0, 1], got {p}")


def _check_rgb(images: Tensor, op: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{op} expects RGB images shaped (B, 3, H, W), got {tuple(images.shape)}")


def _grayscale(images: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)``, in the same floating-point order as torchvision's kernel."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


@dataclass(frozen=True)
class NoParams:
    """Parameters of an op that draws nothing."""


@dataclass(frozen=True)
class MaskParams:
    """Which samples an op with probability ``p`` is applied to: bool ``(B,)``."""

    apply: Tensor


@dataclass(frozen=True)
class CropParams:
    """Crop boxes in input pixels, one per sample: int64 ``(B,)`` each."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


@dataclass(frozen=True)
class ColorJitterParams:
    """Per-sample jitter: ``apply`` bool ``(B,)``; factors float ``(B,)``; ``order`` int64 ``(B, 4)``.

    ``order[b]`` is a permutation of ``0..3`` (brightness, contrast, saturation, hue), the order in
    which sample ``b`` receives the four adjustments, as torchvision's ``fn_idx``.
    """

    apply: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor


@dataclass(frozen=True)
class GaussianBlurParams:
    """Which samples are blurred (bool ``(B,)``) and their standard deviation (float ``(B,)``)."""

    apply: Tensor
    sigma: Tensor


class Op(ABC, Generic[P]):
    """A batched augmentation: per-sample parameters, then a deterministic batched apply."""

    @abstractmethod
    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> P:
        """Draw the parameters of ``batch_size`` images of size ``height x width``."""

    @abstractmethod
    def apply(self, images: Tensor, params: P) -> Tensor:
        """Apply the op to float images ``(B, C, H, W)`` with the given per-sample parameters."""

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch_size, _, height, width = images.shape
        return self.apply(images, self.sample_params(batch_size, height, width, generator, images.device))


@dataclass
class RandomResizedCrop(Op[CropParams]):
    """Crop a random box of random area and aspect ratio, and resize it to ``size`` (bilinear).

    The box follows the law of torchvision's ``RandomResizedCrop.get_params`` (Szegedy et al. 2015,
    "Going deeper with convolutions"), with its 10 attempts drawn for all samples at once. The resize
    equals ``resized_crop(..., interpolation=BILINEAR, antialias=False)``. torchvision's default is
    ``antialias=True``; the two differ only where a crop is shrunk, never when it is enlarged (as
    for most crops of a 32 px image resized back to 32 px).
    """

    size: int | tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        self.size = (int(self.size[0]), int(self.size[1]))
        if min(self.size) < 1:
            raise ValueError(f"crop output size must be positive, got {self.size}")
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> CropParams:
        # Draw every attempt of every sample up front, so that the number of random numbers used
        # (and so the rest of the stream) does not depend on which attempt succeeded. float64
        # mirrors the Python-float arithmetic of torchvision's sqrt and round.
        shape = (batch_size, _CROP_ATTEMPTS)
        area = height * width * (
            _rand(shape, generator, device, torch.float64) * (self.scale[1] - self.scale[0]) + self.scale[0]
        )
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(_rand(shape, generator, device, torch.float64) * (log_hi - log_lo) + log_lo)
        # torch.round, like Python's round, rounds half to even.
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        found = fits.any(dim=1)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
        h = h.gather(1, first).squeeze(1)
        w = w.gather(1, first).squeeze(1)

        # No attempt fitted: torchvision's deterministic central crop with the ratio clamped.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fallback_w, fallback_h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fallback_w, fallback_h = int(round(height * self.ratio[1])), height
        else:
            fallback_w, fallback_h = width, height
        h = torch.where(found, h, float(fallback_h))
        w = torch.where(found, w, float(fallback_w))

        # randint(0, n) as floor(U * n); the clamp guards the float rounding of U * n up to n.
        u_top, u_left = _rand((2, batch_size), generator, device, torch.float64)
        top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
        top = torch.where(found, top, float((height - fallback_h) // 2))
        left = torch.where(found, left, float((width - fallback_w) // 2))
        return CropParams(top=top.long(), left=left.long(), height=h.long(), width=w.long())

    def apply(self, images: Tensor, params: CropParams) -> Tensor:
        height, width = images.shape[-2:]
        out_h, out_w = self.size
        ys = self._source_coordinates(out_h, params.top, params.height, images.dtype)
        xs = self._source_coordinates(out_w, params.left, params.width, images.dtype)
        # grid_sample with align_corners=True maps -1 and +1 to the first and last pixel centres.
        gy = ys * (2.0 / max(height - 1, 1)) - 1.0
        gx = xs * (2.0 / max(width - 1, 1)) - 1.0
        grid = torch.stack(
            (gx[:, None, :].expand(-1, out_h, -1), gy[:, :, None].expand(-1, -1, out_w)), dim=-1
        )
        # "border" only absorbs the last-ulp rounding of the normalised grid: every coordinate
        # already lies inside its crop box.
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)

    @staticmethod
    def _source_coordinates(out_size: int, start: Tensor, length: Tensor, dtype: torch.dtype) -> Tensor:
        """Input coordinates ``(B, out_size)`` that ``interpolate(bilinear)`` of the crop reads.

        Half-pixel centres scaled by ``length / out_size`` (computed in the image dtype, as
        PyTorch's upsampling kernel does), clamped to the crop: interpolating the cropped tensor
        never reads outside it, it repeats the border pixel.
        """
        length = length.to(dtype)[:, None]
        scale = length / out_size
        dst = torch.arange(out_size, device=start.device, dtype=dtype)[None, :]
        src = (dst + 0.5) * scale - 0.5
        src = torch.minimum(src.clamp(min=0.0), length - 1)
        return src + start.to(dtype)[:, None]


class _PerSampleCoin(Op[MaskParams]):
    """An op applied to each sample with probability ``p`` (a field of the subclass)."""

    p: float

    def __post_init__(self) -> None:
        _check_probability(self.p)

    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> MaskParams:
        return MaskParams(apply=_bernoulli(batch_size, self.p, generator, device))


@dataclass
class HorizontalFlip(_PerSampleCoin):
    """Mirror each image left-right with probability ``p``."""

    p: float = 0.5

    def apply(self, images: Tensor, params: MaskParams) -> Tensor:
        return torch.where(_per_sample(params.apply), images.flip(-1), images)


def _factor_range(value: float | Sequence[float], name: str) -> tuple[float, float] | None:
    """torchvision's reading of a jitter strength: ``x -> [max(0, 1 - x), 1 + x]``; None is off."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        low, high = max(0.0, 1.0 - value), 1.0 + value
    else:
        low, high = (float(v) for v in value)
        if not 0.0 <= low <= high:
            raise ValueError(f"{name} range must satisfy 0 <= min <= max, got {value}")
    return None if low == high == 1.0 else (low, high)


def _hue_range(value: float | Sequence[float]) -> tuple[float, float] | None:
    if isinstance(value, (int, float)):
        low, high = -float(value), float(value)
    else:
        low, high = (float(v) for v in value)
    if not -0.5 <= low <= high <= 0.5:
        raise ValueError(f"hue must lie in [-0.5, 0.5], got {value}")
    return None if low == high == 0.0 else (low, high)


def _rgb_to_hsv(images: Tensor) -> Tensor:
    """torchvision's (Pillow-derived) RGB -> HSV, step for step, so that the round trip matches."""
    r, g, b = images.unbind(dim=-3)
    # Pairwise max / min equal aminmax over the 3 channels bit for bit, several times faster on CPU.
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    # Where max == min, hue and saturation are 0; replacing the divisors by 1 avoids a NaN there.
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(-3)
    rc, gc, bc = ((maxc.unsqueeze(-3) - images) / divisor).unbind(dim=-3)
    max_is_not_r = maxc != r
    max_is_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(max_is_g & max_is_not_r)
    hr = bc.sub(gc).mul_(~max_is_not_r)
    hb = gc.add(4.0).sub_(rc).mul_(max_is_not_r & ~max_is_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


# For each hue sector, which of (v, p, q, t) becomes r, g and b (torchvision's table, transposed).
_SECTOR_TO_RGB = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(dim=-3)
    h6 = h.mul(6)
    sector = torch.floor(h6)
    f = h6.sub_(sector)
    sector = sector.to(torch.long).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    # A table lookup per pixel; embedding is the fastest form of it on CPU (2x a fancy index).
    select = F.embedding(sector, _constant(_SECTOR_TO_RGB, torch.long, hsv.device)).movedim(-1, -3)
    return vpqt.gather(-3, select)


def _adjust_hue(images: Tensor, hue_factor: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` on float RGB, with one hue shift per sample (``(B,)``)."""
    hsv = _rgb_to_hsv(images)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + hue_factor.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


@dataclass
class ColorJitter(Op[ColorJitterParams]):
    """Random brightness, contrast, saturation and hue, in a random order per sample.

    The colour distortion of SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive
    Learning of Visual Representations"), whose strength-``s`` setting is
    ``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)`` applied with probability 0.8. Factors, order and the
    formulas follow torchvision's ``ColorJitter`` wrapped in ``RandomApply(p)``; ``p`` is built in.
    """

    brightness: float | tuple[float, float] = 0.4
    contrast: float | tuple[float, float] = 0.4
    saturation: float | tuple[float, float] = 0.4
    hue: float | tuple[float, float] = 0.1
    p: float = 0.8

    _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)

    def __post_init__(self) -> None:
        _check_probability(self.p)
        self._ranges = (
            _factor_range(self.brightness, "brightness"),
            _factor_range(self.contrast, "contrast"),
            _factor_range(self.saturation, "saturation"),
        )
        self._hue_range = _hue_range(self.hue)

    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> ColorJitterParams:
        apply = _bernoulli(batch_size, self.p, generator, device)
        # Sorting i.i.d. uniforms gives a uniform random permutation per sample, like randperm(4).
        order = _rand((batch_size, 4), generator, device).argsort(dim=1)
        # An adjustment that is switched off gets the factor that leaves the image untouched.
        brightness, contrast, saturation = (
            _uniform(batch_size, *bounds, generator, device)
            if bounds is not None
            else torch.ones(batch_size, device=device)
            for bounds in self._ranges
        )
        hue = (
            _uniform(batch_size, *self._hue_range, generator, device)
            if self._hue_range is not None
            else torch.zeros(batch_size, device=device)
        )
        return ColorJitterParams(apply, brightness, contrast, saturation, hue, order)

    def apply(self, images: Tensor, params: ColorJitterParams) -> Tensor:
        _check_rgb(images, "ColorJitter")
        # Brightness, contrast and saturation are the same blend x * f + target * (1 - f) with a
        # different target (black, the mean gray level, the gray image), so one batched blend per
        # position serves every sample whatever its order; f = 1 leaves a sample exactly as it is
        # (x * 1 + target * 0 == x). Hue is not a blend: rather than run it at each of the four
        # positions, run the blends that come before each sample's hue, then hue once for the whole
        # batch, then the blends that come after it.
        hue_position = (params.order == self._HUE).to(torch.uint8).argmax(dim=1)
        # Each sample's three blends in its own order: sort its positions with hue's pushed last.
        positions = torch.arange(4, device=params.order.device)
        rank = positions + 4 * (params.order == self._HUE)
        blend_order = params.order.gather(1, rank.argsort(dim=1)[:, :3])
        factors = torch.stack((params.brightness, params.contrast, params.saturation), dim=1)
        blend_factors = factors.to(images.dtype).gather(1, blend_order)

        def blends(x: Tensor, before_hue: bool) -> Tensor:
            for step in range(3):
                active = params.apply & ((step < hue_position) if before_hue else (step >= hue_position))
                factor = torch.where(active, blend_factors[:, step], 1.0)
                x = self._blend(x, blend_order[:, step], factor)
            return x

        x = blends(images, before_hue=True)
        if self._hue_range is not None:
            x = torch.where(_per_sample(params.apply), _adjust_hue(x, params.hue.to(images.dtype)), x)
        return blends(x, before_hue=False)

    def _blend(self, images: Tensor, kind: Tensor, factor: Tensor) -> Tensor:
        gray = _grayscale(images)
        mean_gray = gray.mean(dim=(-3, -2, -1), keepdim=True)
        kind = _per_sample(kind)
        target = torch.where(
            kind == self._SATURATION, gray, torch.where(kind == self._CONTRAST, mean_gray, 0.0)
        )
        factor = _per_sample(factor)
        return (images * factor).add_(target * (1.0 - factor)).clamp_(0.0, 1.0)


@dataclass
class RandomGrayscale(_PerSampleCoin):
    """Replace an image by its luma on all three channels with probability ``p`` (SimCLR: 0.2)."""

    p: float = 0.2

    def apply(self, images: Tensor, params: MaskParams) -> Tensor:
        _check_rgb(images, "RandomGrayscale")
        return torch.where(_per_sample(params.apply), _grayscale(images).expand_as(images), images)


@dataclass
class GaussianBlur(Op[GaussianBlurParams]):
    """Gaussian blur with ``sigma ~ U(sigma)`` per sample, applied with probability ``p``.

    SimCLR (Chen et al. 2020) blurs half of the images with a kernel of 10% of the image side and
    ``sigma`` in ``[0.1, 2.0]``. Kernel and reflect padding as torchvision's ``gaussian_blur``; the
    2-d kernel is separable, so it runs as two 1-d grouped convolutions over the whole batch.
    """

    kernel_size: int
    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_probability(self.p)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if not 0.0 < self.sigma[0] <= self.sigma[1]:
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {self.sigma}")

    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> GaussianBlurParams:
        apply = _bernoulli(batch_size, self.p, generator, device)
        sigma = _uniform(batch_size, *self.sigma, generator, device)
        return GaussianBlurParams(apply=apply, sigma=sigma)

    def apply(self, images: Tensor, params: GaussianBlurParams) -> Tensor:
        batch_size, channels, height, width = images.shape
        size = self.kernel_size
        # torchvision's kernel: exp(-x^2 / (2 sigma^2)) on integer offsets, written as a softmax of
        # -(x / sigma)^2 over offsets scaled by 1 / sqrt(2).
        lim = (size - 1) / (2.0 * math.sqrt(2.0))
        offsets = torch.linspace(-lim, lim, steps=size, dtype=images.dtype, device=images.device)
        sigma = params.sigma.to(images.dtype)[:, None]
        kernel = torch.softmax(offsets.div(sigma).pow(2).neg(), dim=1)  # (B, size)
        kernel = kernel.repeat_interleave(channels, dim=0)  # one filter per (sample, channel)

        # The batch becomes the channels of a single image, so each sample gets its own kernel.
        planes = images.reshape(1, batch_size * channels, height, width)
        half = size // 2
        planes = F.pad(planes, (half, half, half, half), mode="reflect")
        groups = batch_size * channels
        planes = F.conv2d(planes, kernel.view(groups, 1, 1, size), groups=groups)
        planes = F.conv2d(planes, kernel.view(groups, 1, size, 1), groups=groups)
        blurred = planes.view(batch_size, channels, height, width)
        return torch.where(_per_sample(params.apply), blurred, images)


@dataclass
class Solarize(_PerSampleCoin):
    """Invert the pixels at or above ``threshold`` with probability ``p``.

    BYOL (Grill et al. 2020, "Bootstrap your own latent") solarizes the second view with p = 0.2.
    """

    threshold: float = 0.5
    p: float = 0.2

    def apply(self, images: Tensor, params: MaskParams) -> Tensor:
        invert = _per_sample(params.apply) & (images >= self.threshold)
        return torch.where(invert, 1.0 - images, images)


@dataclass
class Normalize(Op[NoParams]):
    """Subtract the per-channel ``mean`` and divide by ``std``; draws nothing."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std differ in length: {self.mean} vs {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> NoParams:
        return NoParams()

    def apply(self, images: Tensor, params: NoParams) -> Tensor:
        if images.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels, the images {images.shape[1]}")
        mean = _constant(self.mean, images.dtype, images.device).view(1, -1, 1, 1)
        std = _constant(self.std, images.dtype, images.device).view(1, -1, 1, 1)
        return (images - mean) / std


class Pipeline:
    """Ops applied in sequence; each draws its parameters from the same generator in turn."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = list(ops)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for op in self.ops:
            images = op(images, generator)
        return images

    def __iter__(self):
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        inner = "".join(f"\n  {op!r}," for op in self.ops)
        return f"Pipeline([{inner}\n])"
