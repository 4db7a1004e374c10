"""Batched, on-device augmentation with per-sample random parameters.

Images reach the training device as uint8 ``(B, C, H, W)``; a :class:`ViewGenerator` built from a
named recipe turns them into the float, normalised views a method trains on, the whole batch at
once, every op drawing its parameters per sample from an explicit :class:`torch.Generator`.
"""

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
    rgb_to_lab,
)
from .recipes import RECIPES, ViewGenerator, ViewGroup, build_view_generator, recipe_names

__all__ = [
    "RECIPES",
    "ColorJitter",
    "GaussianBlur",
    "HorizontalFlip",
    "Normalize",
    "Op",
    "Pipeline",
    "RandomGrayscale",
    "RandomResizedCrop",
    "Solarize",
    "ViewGenerator",
    "ViewGroup",
    "build_view_generator",
    "recipe_names",
    "rgb_to_lab",
]
