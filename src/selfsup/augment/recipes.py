"""Named augmentation recipes, and the module that turns a uint8 batch into its views.

A recipe builds the :class:`~selfsup.augment.ops.Pipeline` of one view from the image size and the
dataset's normalisation; :func:`build_view_generator` repeats it for the views a method needs.
Settings are those of the papers, with their CIFAR variants where the papers give one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from selfsup.errors import ConfigError

from .ops import (
    ColorJitter,
    GaussianBlur,
    HorizontalFlip,
    Normalize,
    Op,
    Pipeline,
    RandomGrayscale,
    RandomResizedCrop,
    Solarize,
)

__all__ = ["RECIPES", "ViewGenerator", "build_view_generator", "recipe_names"]

# A recipe builds one pipeline that every view repeats, or (asymmetric views, as BYOL's) one
# pipeline per view, in view order.
RecipeBuilder = Callable[[int, Sequence[float], Sequence[float]], Pipeline | Sequence[Pipeline]]

# SimCLR turns the blur off on CIFAR-10 (32 px, appendix B.9) and keeps it on for larger images.
_MIN_BLUR_SIZE = 96


class ViewGenerator(nn.Module):
    """Turn a batch of uint8 images into float, normalised views, one pipeline per view.

    The batch is converted to float in ``[0, 1]`` once, on its own device; each pipeline then draws
    its per-sample parameters from ``generator`` in turn, so the same seed gives the same views.
    Pipelines may differ (the crops of multi-crop) or repeat (the two views of SimCLR).
    """

    def __init__(self, pipelines: Sequence[Pipeline]) -> None:
        super().__init__()
        if not pipelines:
            raise ValueError("a ViewGenerator needs at least one pipeline")
        self.pipelines = list(pipelines)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Views of ``images`` ``(B, C, H, W)``: uint8 in ``[0, 255]``, or float already in ``[0, 1]``.

        ``generator`` None draws from torch's default generator of the batch's device.
        """
        if images.dtype == torch.uint8:
            # The scaling of torchvision's ToDtype(float32, scale=True).
            images = images.to(torch.float32).mul_(1.0 / 255.0)
        elif not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        return [pipeline(images, generator) for pipeline in self.pipelines]

    def extra_repr(self) -> str:
        return "\n".join(f"({i}): {pipeline!r}" for i, pipeline in enumerate(self.pipelines))


def _blur_kernel_size(image_size: int) -> int:
    """10% of the image side, made odd (SimCLR appendix A)."""
    size = int(0.1 * image_size)
    return size + 1 if size % 2 == 0 else size


def _blur(image_size: int) -> list[Op]:
    if image_size < _MIN_BLUR_SIZE:
        return []
    return [GaussianBlur(_blur_kernel_size(image_size), sigma=(0.1, 2.0), p=0.5)]


def simclr(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    """SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations"), CIFAR settings: crop scale (0.08, 1), flip, colour distortion of strength
    0.5 (jitter 0.4, 0.4, 0.4, 0.1 with p = 0.8, grayscale p = 0.2), blur only from 96 px on."""
    return Pipeline(
        [
            RandomResizedCrop(image_size, scale=(0.08, 1.0)),
            HorizontalFlip(p=0.5),
            ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            RandomGrayscale(p=0.2),
            *_blur(image_size),
            Normalize(mean, std),
        ]
    )


def moco_v2(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    """MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"): crop
    scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, blur with
    sigma in [0.1, 2] and p = 0.5 (from 96 px on, as for SimCLR), flip; in the order of the
    reference code (facebookresearch/moco, ``main_moco.py``)."""
    return Pipeline(
        [
            RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            RandomGrayscale(p=0.2),
            *_blur(image_size),
            HorizontalFlip(p=0.5),
            Normalize(mean, std),
        ]
    )


def moco_v1(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    """MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning"): crop scale (0.2, 1), grayscale p = 0.2, jitter (0.4, 0.4, 0.4, 0.4) on every image
    (v1 had no RandomApply), flip, no blur; in the order of the reference code."""
    return Pipeline(
        [
            RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            RandomGrayscale(p=0.2),
            ColorJitter(0.4, 0.4, 0.4, 0.4, p=1.0),
            HorizontalFlip(p=0.5),
            Normalize(mean, std),
        ]
    )


def supcon(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    """SupCon (Khosla et al. 2020, "Supervised Contrastive Learning"), the CIFAR pipeline of the
    SupContrast reference (HobbitLong/SupContrast, ``main_supcon.py``): crop scale (0.2, 1), flip,
    jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, no blur; in that order."""
    return Pipeline(
        [
            RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            HorizontalFlip(p=0.5),
            ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            RandomGrayscale(p=0.2),
            Normalize(mean, std),
        ]
    )


def evaluation(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    """No randomness: the images, already at ``image_size``, are only normalised."""
    return Pipeline([Normalize(mean, std)])


RECIPES: dict[str, RecipeBuilder] = {
    "simclr": simclr,
    "moco_v2": moco_v2,
    "moco_v1": moco_v1,
    "supcon": supcon,
    "eval": evaluation,
}


def recipe_names() -> list[str]:
    """The names :func:`build_view_generator` accepts, sorted."""
    return sorted(RECIPES)


def build_view_generator(
    recipe: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_views: int = 2,
) -> ViewGenerator:
    """The :class:`ViewGenerator` of ``num_views`` independent views drawn with ``recipe``.

    Raises :class:`~selfsup.errors.ConfigError` for an unknown recipe, naming it and the known ones.
    For evaluation, ask for ``num_views=1``: every ``eval`` view is the same image.
    """
    if recipe not in RECIPES:
        raise ConfigError(
            f"unknown augmentation recipe {recipe!r}; known recipes: {', '.join(recipe_names())}"
        )
    if image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    if num_views < 1:
        raise ConfigError(f"num_views must be at least 1, got {num_views}")
    built = RECIPES[recipe](image_size, mean, std)
    if isinstance(built, Pipeline):
        # The views share one pipeline: the ops hold no random state, the generator does.
        return ViewGenerator([built] * num_views)
    # Per-view pipelines (asymmetric recipes): view k uses pipeline k, cycling if more are asked.
    return ViewGenerator([built[k % len(built)] for k in range(num_views)])


def byol(image_size: int, mean: Sequence[float],
         std: Sequence[float]) -> tuple[Pipeline, Pipeline]:
    """BYOL (Grill et al. 2020, "Bootstrap Your Own Latent", Appendix B, Table 6): two asymmetric
    views. Both: crop scale (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale
    p = 0.2. Blur (sigma in [0.1, 2], kernel 10% of the side) with p = 1.0 on the first view and
    0.1 on the second, from 96 px on only (as for SimCLR: at 32 px there is no blur); solarize with
    p = 0.2 on the second view only (p = 0 on the first, so the op is left out there). Barlow Twins
    (Zbontar et al. 2021) uses the same pair."""

    def view(blur_p: float, solarize_p: float) -> Pipeline:
        ops: list[Op] = [
            RandomResizedCrop(image_size, scale=(0.08, 1.0)),
            HorizontalFlip(p=0.5),
            ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            RandomGrayscale(p=0.2),
        ]
        if image_size >= _MIN_BLUR_SIZE:
            ops.append(GaussianBlur(_blur_kernel_size(image_size), sigma=(0.1, 2.0), p=blur_p))
        if solarize_p > 0:
            ops.append(Solarize(threshold=0.5, p=solarize_p))
        return Pipeline([*ops, Normalize(mean, std)])

    return view(blur_p=1.0, solarize_p=0.0), view(blur_p=0.1, solarize_p=0.2)


RECIPES["byol"] = byol
