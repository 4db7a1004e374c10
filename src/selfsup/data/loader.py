"""The one place DataLoaders are built: seeded order, uint8 batches, persistent workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

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


class ResumableSampler(Sampler[int]):
    """The order of every epoch, reproducible from (seed, epoch), split across processes, and
    resumable mid-epoch.

    Epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``, so no sampler
    state needs saving: a resumed run calls :meth:`resume_at` with the epoch and the number of
    batches already trained in it, and that epoch then starts after them. Under DDP each process
    takes every ``world``-th index of the same permutation (the tail that does not divide evenly
    is dropped, as ``DistributedSampler(drop_last=True)`` does); Lightning calls
    :meth:`set_epoch` before every epoch; without it, each full pass moves to the next epoch.
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int = 0) -> None:
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.epoch = 0
        self._resume_epoch, self._resume_batches = -1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self._resume_epoch, self._resume_batches = epoch, batches_done

    def _local_indices(self) -> torch.Tensor:
        from selfsup.distributed import rank, world_size

        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        world = world_size()
        return order[: (self.size // world) * world][rank()::world]

    def __iter__(self) -> Iterator[int]:
        indices = self._local_indices()
        if self.epoch == self._resume_epoch:
            # Idempotent within the epoch: Lightning may create the iterator more than once.
            indices = indices[self._resume_batches * self.batch_size:]
        yield from indices.tolist()
        # A plain loop over the loader reshuffles every epoch; Lightning sets the epoch itself.
        self.epoch += 1

    def __len__(self) -> int:
        from selfsup.distributed import world_size

        return self.size // world_size()


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

    The sampler (:class:`ResumableSampler`) draws each epoch's order from its own generator
    seeded with ``(seed, epoch)``, so the order is reproducible, independent of the global RNG,
    split across DDP processes, and resumable mid-epoch. Workers persist across epochs: forking them again every
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
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ResumableSampler(size, batch_size, shuffle=shuffle, seed=seed),
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
