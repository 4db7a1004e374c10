"""The one place DataLoaders are built: seeded order, uint8 batches, persistent workers."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from selfsup.errors import ConfigError, DataError


class ImageBatch(NamedTuple):
    """A collated batch; still a tuple, so ``images, labels, index = batch`` works."""

    images: torch.Tensor  # uint8 (B, C, H, W): normalised only on the device, after augmentation
    labels: torch.Tensor  # int64 (B,), -1 where unlabeled
    index: torch.Tensor  # int64 (B,), positions in the dataset (memory banks index by them)


def collate(samples: list[tuple[torch.Tensor, int, int]]) -> ImageBatch:
    """Stack ``(image, label, index)`` samples into an :class:`ImageBatch`.

    ``default_collate`` does the stacking because inside a worker it writes the batch straight
    into shared memory, saving a copy on the way to the main process; Python ints become int64.
    """
    images, labels, index = default_collate(samples)
    return ImageBatch(images, labels, index)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` yielding :class:`ImageBatch` (uint8 images, int64 labels
    and indices).

    The sampler draws from its own ``torch.Generator`` seeded with ``seed``, so the order of
    every epoch is reproducible and independent of the global RNG (which model init and
    augmentation also draw from). Workers persist across epochs: forking them again every
    epoch costs seconds on large datasets. ``pin_memory`` defaults to "when CUDA is there".

    A loader that would yield no batch at all (empty dataset, or fewer samples than
    ``batch_size`` with ``drop_last``) is a DataError rather than a silently empty epoch.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0 or (drop_last and size < batch_size):
        raise DataError(
            f"a loader over {size} samples with batch_size={batch_size}, drop_last={drop_last} "
            "would yield no batches"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
