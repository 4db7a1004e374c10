"""Image files in the ImageFolder layout: ``DIR/<class>/<image>``, classes sorted by name.

``DIR`` may hold ``train/`` and ``test/`` (or ``val/``) split folders, each in that layout;
otherwise all of ``DIR`` is the train pool and the caller carves a test split from it. A
folder of images with no class folders is unlabeled (label -1).

Decoding happens in ``__getitem__``, i.e. in the DataLoader workers: open, convert to RGB,
resize the shorter side and center crop. Nothing else (augmentation runs later, on the device).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from selfsup.data.dataset import (UNLABELED, LabeledDataset, SkipLog, one_line, resize_center_crop,
                                  to_chw_tensor)
from selfsup.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
_EXTENSIONS_LISTED = ", ".join(sorted(IMAGE_EXTENSIONS))
# Larger images are refused before decoding: a tiny compressed file can otherwise claim
# gigapixels and exhaust memory (a decompression bomb). 89.5 MP is Pillow's own default;
# Pillow's global is re-bounded in case something in the process switched it off.
MAX_IMAGE_PIXELS = 89_478_485
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    ``convert("RGB")`` covers L, LA, P, RGBA, CMYK, YCbCr... but clips 16-bit greyscale at 255
    (almost all white); those are scaled down to 8 bits instead. Mode ``I`` is how some Pillow
    versions open 16-bit PNGs, so it is scaled the same way.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        eight_bit = np.clip((values * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str], size: int) -> torch.Tensor:
    """Decode one image file to a uint8 (3, size, size) tensor; any failure is a DataError
    naming the file (Pillow raises a dozen exception types on damaged data)."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{path}: {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
                        "(possible decompression bomb)"
                    )
                scale = size / min(width, height)
                if scale < 1:
                    # JPEG only (a no-op elsewhere): let libjpeg decode at 1/2, 1/4 or 1/8 scale
                    # when that still leaves at least the target size; far less work per image.
                    image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
                # Photos store their rotation in EXIF; the label was given to the upright image.
                upright = ImageOps.exif_transpose(image)
                return to_chw_tensor(resize_center_crop(to_rgb(upright), size))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(one_line(f"{path}: cannot decode image ({type(exc).__name__}: {exc})")) from exc


class ImageFileDataset(LabeledDataset):
    """Image files decoded on access; yields ``(uint8 (3, S, S), label, index)``.

    Paths are kept as one numpy bytes array relative to ``root``: a list of a million Python
    strings would be copied page by page into every forked worker as refcounts are touched.
    """

    def __init__(self, root: Path, files: np.ndarray, labels: np.ndarray, image_size: int) -> None:
        self.root = str(root)
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size

    def path(self, index: int) -> Path:
        """The file behind sample ``index``."""
        return Path(self.root) / os.fsdecode(self.files[index])

    def subset(self, positions: np.ndarray) -> ImageFileDataset:
        return ImageFileDataset(Path(self.root), self.files[positions], self.labels[positions], self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if not 0 <= index < len(self.labels):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.labels)}")
        index = int(index)
        return load_image(self.path(index), self.image_size), int(self.labels[index]), index


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(directory: Path, relative_to: Path) -> list[bytes]:
    """Image files below ``directory`` (recursively, in sorted order), relative to ``relative_to``."""
    found = []
    for current, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image(name):
                found.append(os.fsencode(os.path.relpath(os.path.join(current, name), relative_to)))
    return found


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def scan_folder(
    root: Path, image_size: int, class_names: tuple[str, ...] | None = None, skips: SkipLog | None = None
) -> tuple[ImageFileDataset, tuple[str, ...]]:
    """Index the images of one split folder; return the dataset and its class names.

    ``class_names`` fixes the label order (a test split uses the train split's classes); a class
    folder not among them, or one holding no images, is a DataError naming it; given ``skips``,
    a class folder holding no images is recorded there and left out instead. No class
    folders, only images: unlabeled (label -1, no class names).
    """
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    class_dirs = _class_dirs(root)
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and _is_image(p.name))
    if class_dirs and loose:
        raise DataError(
            f"{root}: mixes class folders ({class_dirs[0].name}, ...) with loose images ({loose[0]}, ...); "
            "put every image in a class folder, or use a folder of images only for unlabeled data"
        )
    if not class_dirs:
        if class_names:
            raise DataError(f"{root}: has no class folders, but the train split has classes {', '.join(class_names)}")
        if not loose:
            raise DataError(f"{root}: no images found (extensions: {_EXTENSIONS_LISTED})")
        files = [os.fsencode(name) for name in loose]
        return ImageFileDataset(root, np.array(files), np.full(len(files), UNLABELED), image_size), ()

    found: dict[str, list[bytes]] = {}
    for class_dir in class_dirs:
        images = _images_under(class_dir, root)
        if images:
            found[class_dir.name] = images
            continue
        problem = f"{class_dir}: class folder holds no images (extensions: {_EXTENSIONS_LISTED})"
        if skips is None:
            raise DataError(problem)
        skips.add(problem)
    if not found:
        raise DataError(f"{root}: every class folder is empty (extensions: {_EXTENSIONS_LISTED})")
    names = class_names if class_names is not None else tuple(found)
    if not names:
        raise DataError(f"{root}: has class folders, but the train split is unlabeled")
    label_of = {name: label for label, name in enumerate(names)}
    files, labels = [], []
    for name, images in found.items():
        if name not in label_of:
            raise DataError(f"{root / name}: class {name!r} is not among the train classes {', '.join(names)}")
        files += images
        labels += [label_of[name]] * len(images)
    return ImageFileDataset(root, np.array(files), np.array(labels), image_size), names


@dataclass
class FolderSplits:
    """What a folder provides: the train pool, and test / val splits when it has them."""

    pool: ImageFileDataset
    test: ImageFileDataset | None
    val: ImageFileDataset | None
    class_names: tuple[str, ...]


def read_folder(root: Path, image_size: int, skips: SkipLog | None = None) -> FolderSplits:
    """Read ``root`` as split folders (``train/`` + ``test/`` and/or ``val/``) or as one pool.

    With ``train/`` and ``test/``, a ``val/`` beside them is the validation split; with
    ``train/`` and ``val/`` only, ``val/`` is the held-out test split (ImageNet's layout).
    ``skips``: see :func:`scan_folder`.
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        pool, names = scan_folder(root, image_size, skips=skips)
        return FolderSplits(pool, None, None, names)
    pool, names = scan_folder(train_dir, image_size, skips=skips)
    test_dir, val_dir = root / "test", root / "val"
    test = val = None
    if test_dir.is_dir():
        test, _ = scan_folder(test_dir, image_size, names, skips)
        if val_dir.is_dir():
            val, _ = scan_folder(val_dir, image_size, names, skips)
    elif val_dir.is_dir():
        test, _ = scan_folder(val_dir, image_size, names, skips)
    return FolderSplits(pool, test, val, names)
