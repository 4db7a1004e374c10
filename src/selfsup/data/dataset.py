"""The dataset contract shared by every source, the split records, and stratified splitting.

Every dataset here yields ``(image, label, index)``:

- ``image``: a uint8 tensor (C, H, W), RGB. Images stay uint8 until they reach the device that
  trains; augmentation runs there, batched (see ``selfsup.augment``).
- ``label``: an int class index, or -1 for an unlabeled sample.
- ``index``: the sample's position in *this* dataset (0..len-1). Memory banks and per-sample
  state index by it, so every split re-indexes its samples from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from selfsup.errors import ConfigError, DataError

UNLABELED = -1

# Normalisation statistics (per channel, on the [0, 1] scale). CIFAR-10's are the published
# train-set values, which ../shared/data/cifar10/README.md checks against the pixels.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the library needs to know about a dataset, without touching it.

    ``mean``/``std`` are per-channel on the [0, 1] scale, for normalising on the device.
    ``num_train`` is the size of the train split (after the validation split was carved off).
    ``num_classes`` is 0 and ``class_names`` empty when the data is unlabeled.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_train: int


@dataclass(frozen=True)
class DataSplits:
    """The three splits of one dataset, and its :class:`DataInfo`.

    ``val`` is carved from the source's train pool (stratified, seeded) unless a folder brings
    its own ``val/``; ``train`` is the rest, so the two are disjoint. ``test`` is the held-out
    split; it never depends on ``seed``.
    """

    train: LabeledDataset
    val: LabeledDataset
    test: LabeledDataset
    info: DataInfo


class SkipLog:
    """The bad samples a run with ``data.skip_bad`` left out, one line each (``file: problem``).

    Lives in the main process: file scans add what they skip, and the loaders add what their
    workers could not decode. A file is counted once, however many epochs meet it.
    """

    def __init__(self) -> None:
        self._problems: dict[str, None] = {}  # a dict keeps the order they were first met

    def add(self, problem: str) -> None:
        self._problems[one_line(problem)] = None

    @property
    def count(self) -> int:
        return len(self._problems)

    def problems(self, limit: int | None = None) -> list[str]:
        """The problems in the order they were met, the first ``limit`` of them if given."""
        return list(self._problems)[:limit]


def one_line(text: str) -> str:
    """``text`` with its line breaks folded: errors reach the user as one line."""
    return " ".join(text.splitlines())


SelfT = TypeVar("SelfT", bound="LabeledDataset")


class LabeledDataset(Dataset):
    """Base of the datasets here: ``labels`` known up front, and cheap re-indexed subsets.

    Subclasses keep only compact numpy arrays as state (no lists of Python objects), because
    DataLoader workers forked from the main process would otherwise copy them page by page as
    reference counts change.
    """

    labels: np.ndarray  # int64 (N,), -1 where unlabeled; available without decoding any image

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self: SelfT, positions: np.ndarray) -> SelfT:
        """A dataset of the samples at ``positions``, re-indexed 0..len(positions)-1."""
        raise NotImplementedError


class ArrayDataset(LabeledDataset):
    """Images held in memory as one uint8 array (N, C, H, W); indexing it is the whole cost.

    ``positions`` maps this dataset's index to a row of ``images``, so splits share the one
    array instead of copying it. ``image_size`` different from the stored size resizes in the
    worker, the same way as image files are (shorter side, then center crop).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        image_size: int | None = None,
        positions: np.ndarray | None = None,
    ) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] != 3:
            raise DataError(f"expected uint8 images shaped (N, 3, H, W), got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.all_labels = np.asarray(labels, dtype=np.int64)
        self.positions = np.arange(len(images)) if positions is None else np.asarray(positions, dtype=np.int64)
        self.labels = self.all_labels[self.positions]
        self.stored_size = (images.shape[2], images.shape[3])
        self.image_size = image_size

    def subset(self, positions: np.ndarray) -> ArrayDataset:
        return ArrayDataset(
            self.images, self.all_labels, image_size=self.image_size, positions=self.positions[positions]
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if not 0 <= index < len(self.positions):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.positions)}")
        index = int(index)
        row = self.positions[index]
        # A copy: the caller may write to the tensor, the shared array must not change.
        image = self.images[row].copy()
        if self.image_size is not None and self.stored_size != (self.image_size, self.image_size):
            pil = Image.fromarray(image.transpose(1, 2, 0))
            return to_chw_tensor(resize_center_crop(pil, self.image_size)), int(self.labels[index]), index
        return torch.from_numpy(image), int(self.labels[index]), index


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and center crop size x size.

    Done as one ``resize`` with a source ``box`` (the centered square of side min(w, h)): the
    same result as resize-then-crop, without computing pixels the crop would throw away.
    Pillow's bilinear filter widens its support when shrinking, which is the antialiasing.
    """
    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def to_chw_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def check_image_size(image_size: int | None) -> None:
    """Reject a non-positive or non-integer ``image_size`` with a ConfigError naming it."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive int, got {image_size!r}")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (kept, carved), carving ``fraction`` of every class, seeded.

    Each class (and the unlabeled group, label -1) gives round(n * fraction) samples, at least
    one when fraction > 0 and the class has two or more, and never all of them: every class
    keeps a sample on both sides where it can. Both results are sorted, so a split depends
    only on (labels, fraction, seed), never on the order classes are visited in.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    carved: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = int(round(len(members) * fraction))
        if fraction > 0 and len(members) >= 2:
            count = max(count, 1)
        count = min(count, len(members) - 1)
        carved.append(rng.permutation(members)[:count])
    carved_positions = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    kept_mask = np.ones(len(labels), dtype=bool)
    kept_mask[carved_positions] = False
    return np.flatnonzero(kept_mask), carved_positions.astype(np.int64)
