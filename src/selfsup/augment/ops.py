"""Batched augmentation ops with per-sample random parameters.

Each op works on a whole batch of float images ``(B, C, H, W)`` in ``[0, 1]`` that already sits on
the training device, and is split in two halves:

- ``sample_params(batch_size, height, width, generator, device)`` draws one set of parameters per
  sample from an explicit :class:`torch.Generator`, with the law torchvision's transform uses for a
  single image;
- ``apply(images, params)`` is deterministic and equals torchvision's functional op applied image by
  image with the same parameters (the tests check this op by op).

``op(images, generator)`` does both. Nothing loops over samples: a random decision that
torchvision takes with an ``if`` becomes a per-sample mask, and a random factor a ``(B, 1, 1, 1)``
tensor. On the CPU, where reading a mask costs nothing, an op computes only the samples it
changes; on an accelerator, where reading it would stall the host, it computes the whole batch and
keeps each sample's own result (the tests check that both give the same images). Random numbers
are drawn on the generator's device and then moved, so a CPU generator gives the same views on any
device, and a CUDA generator on a CUDA batch needs no transfer.

Ops that move pixels also say where their outputs come from (``source_boxes``): a pipeline can
record, per output image, the box of its source image it shows, for methods that match locations
across views (PixPro's positive pixel pairs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ChannelParams",
    "ColorDrop",
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
    "rgb_to_lab",
]

P = TypeVar("P")

# ITU-R 601-2 luma, with torchvision's tensor kernels' red weight (0.2989, not 0.299) so that our
# grayscale, contrast and saturation equal theirs.
_LUMA = (0.2989, 0.587, 0.114)

# Floats in a slice of the batch that a pipeline runs through its ops at once on the CPU: with
# the colour jitter's temporaries, a few times this fits in a core's L2 cache (2 MiB here).
_CACHE_BLOCK = 2**19

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


def _choose(apply: Tensor, chosen: Tensor, otherwise: Tensor, in_place: bool = False) -> Tensor:
    """Per sample, ``chosen`` where ``apply`` (bool ``(B,)``) holds, else ``otherwise``.

    A lerp with weight 0 or 1 is an exact selection between finite values (torch evaluates it as
    ``a + 0 * (b - a)`` and ``b - (b - a) * 0``) and a vectorised kernel on the CPU, where
    ``torch.where`` is not (measured 1.5 to 10 times slower). ``in_place`` writes into ``otherwise``.
    """
    weight = _per_sample(apply).to(otherwise.dtype)
    return otherwise.lerp_(chosen, weight) if in_place else torch.lerp(otherwise, chosen, weight)


def _apply_where(
    apply: Tensor, images: Tensor, transform: Callable[[Tensor, Tensor], Tensor], in_place: bool
) -> Tensor:
    """``transform(x, index)`` on the samples where ``apply`` (bool ``(B,)``) holds, the others as
    they are; ``index`` holds the positions of the samples in ``x``, for their parameters.

    Where reading ``apply`` on the host is free (the CPU), only the chosen samples are computed;
    elsewhere the whole batch is, and :func:`_choose` keeps each sample's own result.
    """
    if _host_reads_are_free(images.device):
        index = apply.nonzero().squeeze(1)
        out = images if in_place else images.clone()
        if len(index):
            out.index_copy_(0, index, transform(images.index_select(0, index), index))
        return out
    everything = torch.arange(len(images), device=images.device)
    return _choose(apply, transform(images, everything), images, in_place)


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's values on the host costs nothing more than the read: true on
    the CPU; on an accelerator it would wait for the queued work, so ops avoid it there."""
    return device.type == "cpu"


def _rows(params: P, start: int, stop: int) -> P:
    """The parameters of samples ``start:stop``: every field of a params dataclass is per sample."""
    fields = dataclasses.fields(params)
    return dataclasses.replace(params, **{f.name: getattr(params, f.name)[start:stop] for f in fields})


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


# Linear sRGB to CIE XYZ (sRGB primaries, D65), the matrix of scikit-image's ``rgb2lab``, which
# the CMC code (Tian et al. 2019) calls; the white point is the XYZ of sRGB white (its row sums),
# D65 as that matrix gives it, so greys come out with a = b = 0 exactly.
_SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
_D65_WHITE = tuple(sum(row) for row in _SRGB_TO_XYZ)
# CIE 1976: f(t) = t^(1/3) above (6/29)^3, the tangent line t / (3 (6/29)^2) + 4/29 below.
_LAB_EPSILON = (6 / 29) ** 3
_LAB_SLOPE = 1 / (3 * (6 / 29) ** 2)


def rgb_to_lab(images: Tensor) -> Tensor:
    """CIE 1976 L*a*b* (D65) of sRGB images ``(..., 3, H, W)`` with values in ``[0, 1]``.

    The sRGB transfer curve is undone (IEC 61966-2-1: c / 12.92 up to 0.04045, else
    ((c + 0.055) / 1.055)^2.4), the linear values go to XYZ and are divided by the white point,
    then L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z)). L lies in [0, 100];
    over the sRGB gamut a lies in about [-86.2, 98.2] and b in [-107.9, 94.5].

    Computed with elementwise ops in float32 at least (float64 stays float64): no matmul that
    autocast would lower to bf16. Values outside [0, 1] (rounding after un-normalising) are
    clamped to the gamut first.
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab expects RGB images shaped (..., 3, H, W), "
                         f"got {tuple(images.shape)}")
    rgb = images.to(torch.promote_types(images.dtype, torch.float32)).clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
    red, green, blue = linear.unbind(dim=-3)
    f = []
    for row, white in zip(_SRGB_TO_XYZ, _D65_WHITE):
        t = (red * row[0] + green * row[1] + blue * row[2]) / white
        # The clamp keeps the cube root's unused branch away from values it need not see.
        f.append(torch.where(t > _LAB_EPSILON, t.clamp(min=_LAB_EPSILON).pow(1 / 3),
                             t * _LAB_SLOPE + 4 / 29))
    fx, fy, fz = f
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


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

    def apply_(self, images: Tensor, params: P) -> Tensor:
        """:meth:`apply` that may overwrite ``images``, which the caller no longer needs.

        A pipeline calls it on the batches it made itself: an op that can work in place saves
        writing a new batch. By default it is :meth:`apply`.
        """
        return self.apply(images, params)

    def source_boxes(self, boxes: Tensor, params: P, height: int, width: int) -> Tensor:
        """Where each output image lies in the source image, given where each input lies.

        ``boxes`` (B, 4) holds, per input image of ``height x width`` pixels, the box of the source
        image it shows: ``(x0, y0, x1, y1)`` in ``[0, 1]`` (fractions of the source's width and
        height), its left edge at ``x0`` and its right edge at ``x1``, so a mirrored image has
        ``x0 > x1``. The point at fraction ``(u, v)`` of the image lies at
        ``(x0 + u (x1 - x0), y0 + v (y1 - y0))`` of the source. An op that moves no pixel (the
        default) returns the boxes as they are.
        """
        return boxes

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
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            # Fractions of the image's area: a crop cannot be larger than the image.
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
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

    def apply(self, images: Tensor, params: CropParams, mirror: Tensor | None = None) -> Tensor:
        """Crop and resize; ``params`` may hold ``n`` boxes per image (``n * B`` in all).

        Box ``k * B + b`` is cut from image ``b``: the ``n`` crops of a multi-crop group come out
        as one batch, copy-major, without first repeating the (larger) input ``n`` times.
        ``mirror`` (bool ``(n * B,)``) flips the chosen crops left-right by reading their source
        columns backwards, which equals :class:`HorizontalFlip` after the crop at no extra cost.
        """
        batch, channels, height, width = images.shape
        copies, remainder = divmod(len(params.top), batch)
        if remainder or not copies:
            raise ValueError(f"{len(params.top)} crop boxes do not divide among {batch} images")
        out_h, out_w = self.size
        ys = self._source_coordinates(out_h, params.top, params.height, images.dtype)
        xs = self._source_coordinates(out_w, params.left, params.width, images.dtype)
        if mirror is not None:
            xs = torch.where(mirror[:, None], xs.flip(1), xs)
        # grid_sample with align_corners=True maps -1 and +1 to the first and last pixel centres.
        # The copies of image b stack along the grid's rows: one call samples them all.
        gy = (ys * (2.0 / max(height - 1, 1)) - 1.0).view(copies, batch, out_h).transpose(0, 1)
        gx = (xs * (2.0 / max(width - 1, 1)) - 1.0).view(copies, batch, out_w).transpose(0, 1)
        grid = torch.stack(
            (gx[:, :, None, :].expand(-1, -1, out_h, -1), gy[:, :, :, None].expand(-1, -1, -1, out_w)), dim=-1
        ).view(batch, copies * out_h, out_w, 2)
        # "border" only absorbs the last-ulp rounding of the normalised grid: every coordinate
        # already lies inside its crop box.
        crops = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
        if copies == 1:
            return crops
        crops = crops.view(batch, channels, copies, out_h, out_w).permute(2, 0, 1, 3, 4)
        return crops.reshape(copies * batch, channels, out_h, out_w)

    def source_boxes(self, boxes: Tensor, params: CropParams, height: int, width: int) -> Tensor:
        """The crop box ``params`` (in the input's pixels) placed inside each input's own box.

        The resize maps the crop's edges to the output's edges (the half-pixel centres of
        :meth:`_source_coordinates`), so output pixel centre ``(j + 0.5) / out_w`` lies at the same
        fraction of the crop box; only where an enlarged crop repeats its border pixel does a
        pixel read a source point up to half an input pixel away.
        """
        x0, y0, x1, y1 = boxes.unbind(1)
        left = params.left.to(boxes.dtype) / width
        right = (params.left + params.width).to(boxes.dtype) / width
        top = params.top.to(boxes.dtype) / height
        bottom = (params.top + params.height).to(boxes.dtype) / height
        box_width, box_height = x1 - x0, y1 - y0
        return torch.stack((x0 + box_width * left, y0 + box_height * top,
                            x0 + box_width * right, y0 + box_height * bottom), dim=1)

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
        return _choose(params.apply, images.flip(-1), images)

    def source_boxes(self, boxes: Tensor, params: MaskParams, height: int, width: int) -> Tensor:
        # A mirrored image shows the same box read right to left: its left edge is the box's right.
        # (Stacked, not indexed with a list, which would copy an index to the device.)
        x0, y0, x1, y1 = boxes.unbind(1)
        return torch.where(params.apply[:, None], torch.stack((x1, y0, x0, y1), dim=1), boxes)


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


# The hue of each output channel (red, green, blue), on torchvision's hue scale times 6.
_CHANNEL_HUES = (0.0, 2.0, 4.0)


def _adjust_hue(images: Tensor, hue_factor: Tensor, out: Tensor | None = None) -> Tensor:
    """torchvision's ``adjust_hue`` on float RGB, with one hue shift per sample (``(B,)``).

    The hue is computed with torchvision's (Pillow-derived) float32 steps, so it is the same to the
    bit. The way back skips HSV: with ``h6`` the shifted hue times 6 and ``d = |h6 - c|`` its
    distance to the channel's own hue ``c`` (0, 2, 4), each channel is
    ``max - (max - min) * clamp(2 - |d - 3|, 0, 1)``, torchvision's six-sector table of
    ``v, p, q, t`` in closed form (``v * s == max - min``); gray pixels (``max == min``) and the
    channel that keeps the maximum come back exactly. ``out`` may be ``images`` itself.
    """
    r, g, b = images.unbind(dim=-3)
    # Pairwise max / min equal aminmax over the 3 channels bit for bit, several times faster on CPU.
    maxc = torch.maximum(r, g)
    maxc = torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    minc = torch.minimum(minc, b, out=minc)
    channels_range = maxc - minc
    # Where max == min every numerator below is 0 too: torchvision divides by 1 there to avoid a
    # NaN, and any positive divisor gives the same 0. (Only a range below float32's smallest
    # normal number, 1e-38, is changed; the output moves by less than that range.)
    divisor = channels_range.clamp_min(torch.finfo(images.dtype).tiny).unsqueeze(-3)
    rc, gc, bc = (maxc.unsqueeze(-3) - images).div_(divisor).unbind(dim=-3)
    # torchvision sums three masked terms of which one is non-zero; selecting it is the same sum.
    # sign() of a difference that cannot be negative is an exact 0 / 1 mask (1: not equal) and,
    # unlike a comparison, a vectorised float kernel; lerp with it is an exact selection.
    r_is_not_max = torch.sign(maxc - r)
    g_is_not_max = torch.sign(maxc - g)
    h_not_r = torch.lerp((rc + 2.0).sub_(bc), (gc + 4.0).sub_(rc), g_is_not_max)
    h = torch.lerp(bc - gc, h_not_r, r_is_not_max)
    # fmod(h / 6 + 1, 1), then (h + shift) % 1: both arguments lie within one unit of [0, 1), where
    # x - floor(x) (frac for the positive first) is the same exact subtraction and several times
    # faster than fmod / remainder.
    h = h.mul_(1.0 / 6.0).add_(1.0).frac_().add_(hue_factor.view(-1, 1, 1))
    h6 = h.sub_(torch.floor(h)).mul_(6.0).unsqueeze(-3)
    centres = _constant(_CHANNEL_HUES, images.dtype, images.device).view(1, 3, 1, 1)
    # -clamp(2 - |d - 3|, 0, 1), built in place (in ``out`` when given: the input is read by now).
    weight = torch.sub(h6, centres, out=out).abs_().sub_(3.0).abs_().sub_(2.0).clamp_(-1.0, 0.0)
    return torch.addcmul(maxc.unsqueeze(-3), channels_range.unsqueeze(-3), weight, out=weight)


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
        return self._jitter(images, params, torch.empty_like(images))

    def apply_(self, images: Tensor, params: ColorJitterParams) -> Tensor:
        return self._jitter(images, params, images)

    def _jitter(self, images: Tensor, params: ColorJitterParams, out: Tensor) -> Tensor:
        _check_rgb(images, "ColorJitter")
        # Brightness, contrast and saturation are the same blend x * f + target * (1 - f) with a
        # different target (black, the mean gray level, the gray image), so one batched blend per
        # step serves every sample whatever its order; f = 1 leaves a sample exactly as it is
        # (x * 1 + target * 0 == x). Hue is not a blend: rather than run it at each of the four
        # positions, run the blends that come before each sample's hue, then hue once, then the
        # blends that come after it.
        batch = images.shape[0]
        is_hue = params.order == self._HUE
        hue_position = is_hue.to(torch.uint8).argmax(dim=1)
        # Each sample's three blends in its own order: sort its positions with hue's pushed last.
        rank = torch.arange(4, device=params.order.device) + 4 * is_hue
        kinds = params.order.gather(1, rank.argsort(dim=1)[:, :3])

        # Samples sorted by hue position, the untouched ones last: those with blend `step` before
        # their hue are then a suffix of the jittered ones, those with it after a prefix, and each
        # pass can run on a contiguous slice that holds every sample it changes. On the CPU the
        # slice bounds are free to read; on an accelerator reading them would block the host, so
        # there every pass spans the batch and the identity factors leave the others unchanged.
        group = torch.where(params.apply, hue_position, 4)
        order = group.argsort(stable=True)
        group, kinds = group[order, None], kinds[order]
        factors = torch.stack((params.brightness, params.contrast, params.saturation), dim=1)
        factors = factors[order].to(images.dtype).gather(1, kinds)
        steps = torch.arange(3, device=group.device)
        # Per sample and step, (factor, weight of the gray image, weight of its mean) of the pass
        # before the hue and of the pass after it: identity (1, 0, 0) where the step is elsewhere.
        passes = []
        for applies in ((group > steps) & (group < 4), group <= steps):
            factor = torch.where(applies, factors, 1.0)
            weight = 1.0 - factor
            passes.append(
                (
                    factor,
                    torch.where(kinds == self._SATURATION, weight, 0.0),
                    torch.where(kinds == self._CONTRAST, weight, 0.0),
                )
            )
        tight = _host_reads_are_free(images.device)
        if tight:
            ends = torch.bincount(group.squeeze(1), minlength=5).cumsum(0).tolist()
            starts = [0, *ends[:3]]
        else:
            ends, starts = [batch] * 5, [0] * 4
        jittered = ends[3]
        x = images.index_select(0, order)

        def blend(step: int, low: int, high: int, weights: tuple[Tensor, Tensor, Tensor]) -> None:
            if low < high:
                self._blend(x[low:high], *(w[low:high, step] for w in weights))

        for step in range(3):
            # Blend `step` precedes hue where the hue comes later: hue positions step + 1 to 3.
            blend(step, starts[step + 1], jittered, passes[0])
        if self._hue_range is not None and jittered > 0:
            hued, shift = x[:jittered], params.hue[order[:jittered]].to(images.dtype)
            if tight:  # the slice only holds jittered samples
                _adjust_hue(hued, shift, out=hued)
            else:
                _choose(group[:jittered, 0] < 4, _adjust_hue(hued, shift), hued, in_place=True)
        for step in range(3):
            # Blend `step` follows hue where the hue came at or before it: positions 0 to step.
            blend(step, 0, ends[step], passes[1])
        return out.index_copy_(0, order, x)

    @staticmethod
    def _blend(images: Tensor, factor: Tensor, gray_weight: Tensor, mean_weight: Tensor) -> None:
        """``images * factor + gray * gray_weight + mean(gray) * mean_weight``, clamped, in place."""
        gray = _grayscale(images)
        mean_target = gray.mean(dim=(-3, -2, -1), keepdim=True).mul_(_per_sample(mean_weight))
        target = torch.addcmul(mean_target, gray, _per_sample(gray_weight), out=gray)
        torch.addcmul(target, images, _per_sample(factor), out=images).clamp_(0.0, 1.0)


@dataclass
class RandomGrayscale(_PerSampleCoin):
    """Replace an image by its luma on all three channels with probability ``p`` (SimCLR: 0.2)."""

    p: float = 0.2

    def apply(self, images: Tensor, params: MaskParams) -> Tensor:
        return self._gray(images, params, in_place=False)

    def apply_(self, images: Tensor, params: MaskParams) -> Tensor:
        return self._gray(images, params, in_place=True)

    def _gray(self, images: Tensor, params: MaskParams, in_place: bool) -> Tensor:
        _check_rgb(images, "RandomGrayscale")
        return _apply_where(params.apply, images, lambda x, _: _grayscale(x).expand_as(x), in_place=in_place)


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
        return _apply_where(params.apply, images, lambda x, i: self._blur(x, params.sigma[i]), in_place=False)

    def apply_(self, images: Tensor, params: GaussianBlurParams) -> Tensor:
        return _apply_where(params.apply, images, lambda x, i: self._blur(x, params.sigma[i]), in_place=True)

    def _blur(self, images: Tensor, sigma: Tensor) -> Tensor:
        batch_size, channels, height, width = images.shape
        size = self.kernel_size
        # torchvision's kernel: exp(-x^2 / (2 sigma^2)) on integer offsets, written as a softmax of
        # -(x / sigma)^2 over offsets scaled by 1 / sqrt(2).
        lim = (size - 1) / (2.0 * math.sqrt(2.0))
        offsets = torch.linspace(-lim, lim, steps=size, dtype=images.dtype, device=images.device)
        sigma = sigma.to(images.dtype)[:, None]
        kernel = torch.softmax(offsets.div(sigma).pow(2).neg(), dim=1)  # (B, size)
        kernel = kernel.repeat_interleave(channels, dim=0)  # one filter per (sample, channel)

        # The batch becomes the channels of a single image, so each sample gets its own kernel.
        planes = images.reshape(1, batch_size * channels, height, width)
        half = size // 2
        planes = F.pad(planes, (half, half, half, half), mode="reflect")
        groups = batch_size * channels
        planes = F.conv2d(planes, kernel.view(groups, 1, 1, size), groups=groups)
        planes = F.conv2d(planes, kernel.view(groups, 1, size, 1), groups=groups)
        return planes.view(batch_size, channels, height, width)


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


@dataclass(frozen=True)
class ChannelParams:
    """Which samples an op applies to (bool ``(B,)``) and the channel each keeps (int64 ``(B,)``)."""

    apply: Tensor
    channel: Tensor


@dataclass
class ColorDrop(Op[ChannelParams]):
    """With probability ``p``, keep one colour channel, drawn uniformly, and set the other two to
    ``fill``.

    The "color dropping" of CPC v2 (Hénaff et al. 2020, "Data-Efficient Image Recognition with
    Contrastive Predictive Coding", ICML, Section 4.1), applied to every patch, after Doersch et
    al. (2015): with one channel left, a patch's colour no longer identifies its neighbours, so
    the prediction task cannot be solved from low-level colour statistics. On normalised inputs
    ``fill = 0`` is the dataset's mean.
    """

    p: float = 1.0
    fill: float = 0.0

    def __post_init__(self) -> None:
        _check_probability(self.p)

    def sample_params(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> ChannelParams:
        apply = _bernoulli(batch_size, self.p, generator, device)
        # floor(3 U) with U in [0, 1): each channel with probability 1/3.
        channel = (_rand((batch_size,), generator, device) * 3).long().clamp_(max=2)
        return ChannelParams(apply=apply, channel=channel)

    def apply(self, images: Tensor, params: ChannelParams) -> Tensor:
        _check_rgb(images, "ColorDrop")
        channels = torch.arange(3, device=images.device)
        keep = (channels[None, :] == params.channel[:, None]) | ~params.apply[:, None]
        return torch.where(keep[:, :, None, None], images, images.new_tensor(self.fill))


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
        mean, std = self._statistics(images)
        return (images - mean).div_(std)

    def apply_(self, images: Tensor, params: NoParams) -> Tensor:
        mean, std = self._statistics(images)
        return images.sub_(mean).div_(std)

    def _statistics(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels, the images {images.shape[1]}")
        mean = _constant(self.mean, images.dtype, images.device).view(1, -1, 1, 1)
        std = _constant(self.std, images.dtype, images.device).view(1, -1, 1, 1)
        return mean, std


def _source_boxes(boxes: Tensor | None, op: Op, params: object, height: int, width: int) -> Tensor | None:
    """``op.source_boxes``, where boxes are being recorded (not None)."""
    return None if boxes is None else op.source_boxes(boxes, params, height, width)


class Pipeline:
    """Ops applied in sequence; each draws its parameters from the same generator in turn."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = list(ops)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None, copies: int = 1) -> Tensor:
        """``copies`` independent draws of the pipeline on each image, as one batch of ``copies * B``.

        Copy ``k`` of image ``b`` is row ``k * B + b``. The result equals each op drawing its
        parameters in turn and being applied to the whole batch, but costs less: a leading
        :class:`RandomResizedCrop` cuts all copies from the original batch, a
        :class:`HorizontalFlip` right after it is folded into the crop, the ops work in place on
        the batches the pipeline made (``apply_``; ``images`` is never written), and on the CPU
        they run slice by slice through the cache.
        """
        return self.views_and_boxes(images, generator, copies, record_boxes=False)[0]

    def views_and_boxes(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        copies: int = 1,
        record_boxes: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`__call__`'s batch, and with ``record_boxes`` the box of its source image that
        each output shows: float32 ``(copies * B, 4)``, row ``k * B + b`` for copy ``k`` of image
        ``b``, as :meth:`Op.source_boxes` defines them (a mirrored view has ``x0 > x1``; a
        pipeline without crop or flip gives ``(0, 0, 1, 1)``). Recording draws no random number,
        so the views are the same either way; without it the boxes are None.
        """
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        ops = self.ops
        batch, _, height, width = images.shape
        boxes = None
        if record_boxes:
            boxes = _constant((0.0, 0.0, 1.0, 1.0), torch.float32, images.device).repeat(copies * batch, 1)
        if ops and isinstance(ops[0], RandomResizedCrop):
            crop, ops = ops[0], ops[1:]
            params = crop.sample_params(copies * batch, height, width, generator, images.device)
            boxes = _source_boxes(boxes, crop, params, height, width)
            mirror = None
            if ops and isinstance(ops[0], HorizontalFlip):
                flip, ops = ops[0], ops[1:]
                flip_params = flip.sample_params(copies * batch, *crop.size, generator, images.device)
                boxes = _source_boxes(boxes, flip, flip_params, *crop.size)
                mirror = flip_params.apply
            images = crop.apply(images, params, mirror)
        elif copies > 1:
            images = images.repeat(copies, 1, 1, 1)
        if not ops:
            return images, boxes
        if len(ops) == len(self.ops) and copies == 1:
            # The caller's batch: the first op makes a new one that the rest may work on in place.
            first, ops = ops[0], ops[1:]
            first_params = first.sample_params(batch, height, width, generator, images.device)
            boxes = _source_boxes(boxes, first, first_params, height, width)
            images = first.apply(images, first_params)
        batch, _, height, width = images.shape
        # Every op draws its parameters for the whole batch first, in order: the stream, and so
        # the views, do not depend on how the batch is cut below.
        params = [op.sample_params(batch, height, width, generator, images.device) for op in ops]
        for op, op_params in zip(ops, params):
            boxes = _source_boxes(boxes, op, op_params, height, width)
        step = batch
        if images.device.type == "cpu":
            # On the CPU, run the ops on slices of the batch small enough to stay in the core's
            # cache from one op to the next, rather than stream the batch through memory per op.
            step = max(1, _CACHE_BLOCK // max(images.shape[1:].numel(), 1))
        blocks, in_place = [], True
        for start in range(0, batch, step):
            block = result = images[start:start + step]
            for op, op_params in zip(ops, params):
                result = op.apply_(result, _rows(op_params, start, start + step))
            blocks.append(result)
            in_place &= result is block
        return (images if in_place else torch.cat(blocks)), boxes

    def __iter__(self):
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        inner = "".join(f"\n  {op!r}," for op in self.ops)
        return f"Pipeline([{inner}\n])"
