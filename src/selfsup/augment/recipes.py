"""Named augmentation recipes, and the module that turns a uint8 batch into its views.

A recipe declares its views as :class:`ViewGroup` s: a pipeline, and how many views it draws.
:class:`ViewGenerator` runs each group as one batch (every image ``count`` times, one pass of each
op, then split), so two views of SimCLR or eight local crops of DINO cost one call per op.

``num_views`` counts every view a method receives. A single-pipeline recipe draws all of them from
one group; multi-crop recipes (``swav``, ``dino``) return their 2 global crops first, then
``num_views - 2`` local crops, so a method with ``N`` local crops sets ``num_views = 2 + N`` (from
a hyper-parameter, as SupCon sets ``num_views`` from its own) and the trainer needs no branch.
Settings are those of the papers, with their CIFAR variants where the papers give one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

__all__ = ["RECIPES", "ViewGenerator", "ViewGroup", "build_view_generator", "recipe_names"]

# SimCLR turns the blur off on CIFAR-10 (32 px, appendix B.9) and keeps it on for larger images.
_MIN_BLUR_SIZE = 96


@dataclass(frozen=True)
class ViewGroup:
    """``count`` views drawn with one ``pipeline``, computed together as one batch."""

    pipeline: Pipeline
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a view group needs at least one view, got {self.count}")


# A recipe builds the groups of ``num_views`` views from the image size and the normalisation.
RecipeBuilder = Callable[[int, Sequence[float], Sequence[float], int], list[ViewGroup]]


class ViewGenerator(nn.Module):
    """Turn a batch of uint8 images into float, normalised views, group by group.

    The batch is converted to float in ``[0, 1]`` once, on its own device. Each group then draws
    its per-sample parameters from ``generator`` in turn, for all its views at once, so the same
    seed gives the same views. Views come back in group order (multi-crop: globals, then locals).
    """

    def __init__(self, groups: Sequence[ViewGroup]) -> None:
        super().__init__()
        if not groups:
            raise ValueError("a ViewGenerator needs at least one view group")
        self.groups = list(groups)

    @property
    def num_views(self) -> int:
        return sum(group.count for group in self.groups)

    @property
    def pipelines(self) -> list[Pipeline]:
        """The pipeline of each view, in view order."""
        return [group.pipeline for group in self.groups for _ in range(group.count)]

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Views of ``images`` ``(B, C, H, W)``: uint8 in ``[0, 255]``, or float already in ``[0, 1]``.

        ``generator`` None draws from torch's default generator of the batch's device.
        """
        return self.views_and_boxes(images, generator, record_boxes=False)[0]

    def views_and_boxes(
        self, images: Tensor, generator: torch.Generator | None = None, record_boxes: bool = True
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The views of :meth:`forward` and, with ``record_boxes``, per view the box of the image
        that each sample shows: float32 ``(B, 4)``, ``(x0, y0, x1, y1)`` in ``[0, 1]`` of the
        image's width and height, with ``x0 > x1`` where the view is mirrored (see
        :meth:`~selfsup.augment.ops.Op.source_boxes`); a group without crop or flip gives the whole
        image. Recording draws no random number: the views are the same either way. Without it
        the boxes are None.
        """
        if images.dtype == torch.uint8:
            # The scaling of torchvision's ToDtype(float32, scale=True).
            images = images.to(torch.float32).mul_(1.0 / 255.0)
        elif not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        views: list[Tensor] = []
        boxes: list[Tensor] = []
        for group in self.groups:
            batch, group_boxes = group.pipeline.views_and_boxes(images, generator, group.count, record_boxes)
            views.extend(batch.chunk(group.count))
            if group_boxes is not None:
                boxes.extend(group_boxes.chunk(group.count))
        return views, (boxes if record_boxes else None)

    def extra_repr(self) -> str:
        return "\n".join(f"({i}) {group.count} x {group.pipeline!r}" for i, group in enumerate(self.groups))


def _blur_kernel_size(image_size: int) -> int:
    """10% of the image side, made odd (SimCLR appendix A)."""
    size = int(0.1 * image_size)
    return size + 1 if size % 2 == 0 else size


def _blur(image_size: int, p: float = 0.5, crop_size: int | None = None) -> list[Op]:
    """The blur with sigma in [0.1, 2] and a kernel of 10% of the crop's side (``crop_size``,
    default ``image_size``), on images of ``image_size`` from 96 px on only."""
    if image_size < _MIN_BLUR_SIZE or p == 0:
        return []
    return [GaussianBlur(_blur_kernel_size(crop_size or image_size), sigma=(0.1, 2.0), p=p)]


def _one_group(pipeline: Pipeline, num_views: int) -> list[ViewGroup]:
    # The views share one pipeline: the ops hold no random state, the generator does.
    return [ViewGroup(pipeline, num_views)]


def simclr(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations"), CIFAR settings: crop scale (0.08, 1), flip, colour distortion of strength
    0.5 (jitter 0.4, 0.4, 0.4, 0.1 with p = 0.8, grayscale p = 0.2), blur only from 96 px on."""
    return _one_group(
        Pipeline(
            [
                RandomResizedCrop(image_size, scale=(0.08, 1.0)),
                HorizontalFlip(p=0.5),
                ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                RandomGrayscale(p=0.2),
                *_blur(image_size),
                Normalize(mean, std),
            ]
        ),
        num_views,
    )


def moco_v2(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"): crop
    scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, blur with
    sigma in [0.1, 2] and p = 0.5 (from 96 px on, as for SimCLR), flip; in the order of the
    reference code (facebookresearch/moco, ``main_moco.py``)."""
    return _one_group(
        Pipeline(
            [
                RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                RandomGrayscale(p=0.2),
                *_blur(image_size),
                HorizontalFlip(p=0.5),
                Normalize(mean, std),
            ]
        ),
        num_views,
    )


def moco_v1(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning"): crop scale (0.2, 1), grayscale p = 0.2, jitter (0.4, 0.4, 0.4, 0.4) on every image
    (v1 had no RandomApply), flip, no blur; in the order of the reference code."""
    return _one_group(
        Pipeline(
            [
                RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                RandomGrayscale(p=0.2),
                ColorJitter(0.4, 0.4, 0.4, 0.4, p=1.0),
                HorizontalFlip(p=0.5),
                Normalize(mean, std),
            ]
        ),
        num_views,
    )


def supcon(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """SupCon (Khosla et al. 2020, "Supervised Contrastive Learning"), the CIFAR pipeline of the
    SupContrast reference (HobbitLong/SupContrast, ``main_supcon.py``): crop scale (0.2, 1), flip,
    jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, no blur; in that order."""
    return _one_group(
        Pipeline(
            [
                RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                HorizontalFlip(p=0.5),
                ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                RandomGrayscale(p=0.2),
                Normalize(mean, std),
            ]
        ),
        num_views,
    )


def cpc(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """CPC's image-level augmentation (van den Oord et al. 2018, "Representation Learning with
    Contrastive Predictive Coding", Section 3.3): a random 256-px crop of the image resized to
    300 px, i.e. a square box of (256/300)^2 of the area at a random place, resized back to
    ``image_size``; and a horizontal flip with p = 0.5. Colour is left alone here: CPC v2
    (Hénaff et al. 2020) drops colour channels per patch, inside the method (``cpc``), since the
    patches of one image must differ in it."""
    side = 256 / 300
    return _one_group(
        Pipeline(
            [
                RandomResizedCrop(image_size, scale=(side**2, side**2), ratio=(1.0, 1.0)),
                HorizontalFlip(p=0.5),
                Normalize(mean, std),
            ]
        ),
        num_views,
    )


def cmc(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """CMC (Tian et al. 2019, "Contrastive Multiview Coding", ECCV 2020), as the authors' code
    (HobbitLong/CMC, ``train_CMC.py``): crop scale (0.2, 1) (``crop_low``, 0.2 by default; the
    code lowers it to 0.08 for its full-ImageNet ResNets), horizontal flip, no colour jitter, no
    grayscale and no blur. The views are colour channels of one crop (L and ab of Lab), split by
    the method, so colour is what the views predict from one another: grayscale would leave the
    ab view empty. The images stay RGB here (normalised); the method converts them to Lab."""
    return _one_group(
        Pipeline(
            [
                RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                HorizontalFlip(p=0.5),
                Normalize(mean, std),
            ]
        ),
        num_views,
    )


def evaluation(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """No randomness: the images, already at ``image_size``, are only normalised."""
    return _one_group(Pipeline([Normalize(mean, std)]), num_views)


def _byol_view(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
) -> Pipeline:
    """One view of BYOL's family (BYOL, DINO): crop, flip, jitter (0.4, 0.4, 0.2, 0.1) with
    p = 0.8, grayscale p = 0.2, blur (from 96 px images on), solarize; an op of p = 0 is left out."""
    ops: list[Op] = [
        RandomResizedCrop(crop_size, scale=scale),
        HorizontalFlip(p=0.5),
        ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        RandomGrayscale(p=0.2),
        *_blur(image_size, blur_p, crop_size),
    ]
    if solarize_p > 0:
        ops.append(Solarize(threshold=0.5, p=solarize_p))
    return Pipeline([*ops, Normalize(mean, std)])


def byol(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """BYOL (Grill et al. 2020, "Bootstrap Your Own Latent", Appendix B, Table 6): two asymmetric
    views. Both: crop scale (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale
    p = 0.2. Blur (sigma in [0.1, 2], kernel 10% of the side) with p = 1.0 on the first view and
    0.1 on the second, from 96 px on only (as for SimCLR: at 32 px there is no blur); solarize with
    p = 0.2 on the second view only (p = 0 on the first, so the op is left out there). Barlow Twins
    (Zbontar et al. 2021) uses the same pair. More views alternate between the two pipelines."""
    first, second = (
        _byol_view(image_size, mean, std, crop_size=image_size, scale=(0.08, 1.0), blur_p=blur_p,
                   solarize_p=solarize_p)
        for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))
    )
    return [ViewGroup((first, second)[k % 2], 1) for k in range(num_views)]


def _local_crop_size(image_size: int) -> int:
    """The side of a local crop: 96 px for 224 px images as in SwAV and DINO (the same fraction
    from 96 px on), half the side below (16 px on CIFAR)."""
    # The line between CIFAR-sized and larger images is SimCLR's, the one the blur follows too.
    if image_size < _MIN_BLUR_SIZE:
        return max(image_size // 2, 1)
    return round(image_size * 96 / 224)


def _multi_crop(recipe: str, global_crops: Sequence[Pipeline], local: Pipeline, num_views: int) -> list[ViewGroup]:
    """The global crops (one view each, or one group when they share a pipeline), then
    ``num_views - len(global_crops)`` local crops as one group."""
    if num_views < len(global_crops):
        raise ConfigError(
            f"recipe {recipe!r} draws {len(global_crops)} global crops, then local ones: num_views must be "
            f"at least {len(global_crops)} (2 + the number of local crops), got {num_views}"
        )
    if all(pipeline is global_crops[0] for pipeline in global_crops):
        groups = [ViewGroup(global_crops[0], len(global_crops))]
    else:
        groups = [ViewGroup(pipeline, 1) for pipeline in global_crops]
    if num_views > len(global_crops):
        groups.append(ViewGroup(local, num_views - len(global_crops)))
    return groups


def swav(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments"), multi-crop: 2 global crops of ``image_size``, scale (0.14, 1), then
    ``num_views - 2`` local crops, scale (0.05, 0.14) (the paper's 2 x 224 + 6 x 96 is
    ``num_views = 8``). Every crop: flip, colour distortion of strength 1 (jitter 0.8, 0.8, 0.8,
    0.2 with p = 0.8, grayscale p = 0.2), blur p = 0.5 with sigma in [0.1, 2] from 96 px images
    on; the order of the reference code (facebookresearch/swav, ``src/multicropdataset.py``).

    Local crops are 96 px for 224 px images (the same fraction from 96 px on). Below 96 px they
    are half the side, 16 px on CIFAR: the CIFAR configs of solo-learn (``swav.yaml``) use two
    32 px crops and no local ones, and the SwAV repository has no CIFAR config, so neither gives
    a local size; half the side keeps about the paper's ratio (96 / 224 = 0.43)."""

    def crop(size: int, scale: tuple[float, float]) -> Pipeline:
        return Pipeline(
            [
                RandomResizedCrop(size, scale=scale),
                HorizontalFlip(p=0.5),
                ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
                RandomGrayscale(p=0.2),
                *_blur(image_size, 0.5, size),
                Normalize(mean, std),
            ]
        )

    global_crop = crop(image_size, (0.14, 1.0))
    local = crop(_local_crop_size(image_size), (0.05, 0.14))
    return _multi_crop("swav", (global_crop, global_crop), local, num_views)


def dino(image_size: int, mean: Sequence[float], std: Sequence[float], num_views: int) -> list[ViewGroup]:
    """DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"),
    multi-crop as in the reference ``DataAugmentationDINO`` (facebookresearch/dino,
    ``main_dino.py``): 2 global crops of ``image_size``, scale (0.4, 1), the first blurred with
    p = 1.0, the second with p = 0.1 and solarized with p = 0.2; then ``num_views - 2`` local
    crops (the reference's default 8 is ``num_views = 10``), scale (0.05, 0.4), blur p = 0.5.
    Every crop: flip, jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale p = 0.2. Blur only from
    96 px images on; local crops 96 px for 224 px images, half the side below 96 px (see
    :func:`swav`). Resizing is bilinear where the reference uses bicubic."""
    first, second = (
        _byol_view(image_size, mean, std, crop_size=image_size, scale=(0.4, 1.0), blur_p=blur_p,
                   solarize_p=solarize_p)
        for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))
    )
    local = _byol_view(image_size, mean, std, crop_size=_local_crop_size(image_size), scale=(0.05, 0.4),
                       blur_p=0.5, solarize_p=0.0)
    return _multi_crop("dino", (first, second), local, num_views)


RECIPES: dict[str, RecipeBuilder] = {
    "simclr": simclr,
    "moco_v2": moco_v2,
    "moco_v1": moco_v1,
    "supcon": supcon,
    "byol": byol,
    "swav": swav,
    "dino": dino,
    "cpc": cpc,
    "cmc": cmc,
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
    """The :class:`ViewGenerator` of ``num_views`` views drawn with ``recipe``.

    ``num_views`` counts all views, local crops included (see the module's docstring). Raises
    :class:`~selfsup.errors.ConfigError` for an unknown recipe, naming it and the known ones, and
    for a view count the recipe cannot give. For evaluation, ask for ``num_views=1``: every
    ``eval`` view is the same image.
    """
    if recipe not in RECIPES:
        raise ConfigError(
            f"unknown augmentation recipe {recipe!r}; known recipes: {', '.join(recipe_names())}"
        )
    if image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    if num_views < 1:
        raise ConfigError(f"num_views must be at least 1, got {num_views}")
    return ViewGenerator(RECIPES[recipe](image_size, mean, std, num_views))
