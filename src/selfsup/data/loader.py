"""The one place DataLoaders are built: seeded order, uint8 batches, persistent workers.

A sample that cannot be decoded never raises inside a worker (PyTorch would wrap our one-line
DataError in a worker traceback): the worker hands the problem on with its batch, and the main
process raises it, or, with a :class:`SkipLog`, records it and trains on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from selfsup.data.dataset import SkipLog
from selfsup.errors import ConfigError, DataError


class ImageBatch(NamedTuple):
    """A collated batch; still a tuple, so ``images, labels, index = batch`` works."""

    images: torch.Tensor  # uint8 (B, C, H, W): normalised only on the device, after augmentation
    labels: torch.Tensor  # int64 (B,), -1 where unlabeled
    index: torch.Tensor  # int64 (B,), positions in the dataset (memory banks index by them)


class BadSample(NamedTuple):
    """What a worker yields in place of a sample it could not decode: the problem, and the next
    decodable sample of the dataset when the loader keeps batches full (None otherwise)."""

    problem: str  # the DataError's message: ``file: what is wrong``
    substitute: tuple[torch.Tensor, int, int] | None = None


# How far past a bad sample a full-batch loader looks for a decodable one before giving up.
MAX_SUBSTITUTE_TRIES = 64


class CheckedBatch(NamedTuple):
    """A batch as it leaves a worker: the good samples (None if none was), and the problems of
    the samples left out."""

    batch: ImageBatch | None
    problems: list[str]


class _Guarded(Dataset):
    """``dataset`` with a sample's DataError turned into a :class:`BadSample`.

    With ``substitute``, a bad sample comes with the next decodable sample after it (wrapping
    around) so that the batch keeps its size: under DDP every process must gather batches of one
    size, and BatchNorm needs more than one sample. The choice depends on the index only, so it
    is as reproducible as the data order.
    """

    def __init__(self, dataset: Dataset, substitute: bool) -> None:
        self.dataset, self.substitute = dataset, substitute

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | BadSample:
        try:
            return self.dataset[index]
        except DataError as error:
            problem = str(error)
        if self.substitute:
            for offset in range(1, min(MAX_SUBSTITUTE_TRIES, len(self)) + 1):
                try:
                    return BadSample(problem, self.dataset[(index + offset) % len(self)])
                except DataError:
                    continue
        return BadSample(problem)


def collate(samples: list[tuple[torch.Tensor, int, int] | BadSample]) -> CheckedBatch:
    """Stack the good ``(image, label, index)`` samples into an :class:`ImageBatch`; list the
    problems of the bad ones.

    ``default_collate`` does the stacking because inside a worker it writes the batch straight
    into shared memory, saving a copy on the way to the main process; Python ints become int64.
    """
    good = [sample.substitute if isinstance(sample, BadSample) else sample for sample in samples]
    good = [sample for sample in good if sample is not None]
    problems = [sample.problem for sample in samples if isinstance(sample, BadSample)]
    if not good:
        return CheckedBatch(None, problems)
    images, labels, index = default_collate(good)
    return CheckedBatch(ImageBatch(images, labels, index), problems)


class CheckedLoader(DataLoader):
    """A DataLoader yielding :class:`ImageBatch` es whose bad samples were left out.

    Without ``skips``, a bad sample raises its DataError (one line, naming the file) here, in
    the main process; with ``skips``, it is recorded there and its batch goes on without it (a
    batch with no good sample is not yielded), or, with ``drop_last``, with the next decodable
    sample in its place.
    """

    def __init__(self, dataset: Dataset, *args: Any, skips: SkipLog | None = None,
                 **kwargs: Any) -> None:
        # A loader that drops last batches (training) keeps every batch full; see _Guarded.
        super().__init__(_Guarded(dataset, substitute=bool(kwargs.get("drop_last"))), *args,
                         **kwargs)
        self.skips = skips

    def __iter__(self) -> Iterator[ImageBatch]:  # type: ignore[override]
        for checked in super().__iter__():
            if checked.problems:
                if self.skips is None:
                    raise DataError(checked.problems[0])
                for problem in checked.problems:
                    self.skips.add(problem)
            if checked.batch is not None:
                yield checked.batch


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
    skips: SkipLog | None = None,
) -> CheckedLoader:
    """A DataLoader over ``dataset`` yielding :class:`ImageBatch` (uint8 images, int64 labels
    and indices).

    The sampler (:class:`ResumableSampler`) draws each epoch's order from its own generator
    seeded with ``(seed, epoch)``, so the order is reproducible, independent of the global RNG,
    split across DDP processes, and resumable mid-epoch. Workers persist across epochs: forking them again every
    epoch costs seconds on large datasets. ``pin_memory`` defaults to "when CUDA is there".

    A loader that would yield no batch at all (empty dataset, or fewer samples than
    ``batch_size`` with ``drop_last``) is a DataError rather than a silently empty epoch.
    A sample that cannot be decoded is a DataError naming its file; given ``skips`` (with
    ``data.skip_bad``), it is recorded there and left out of its batch (see :class:`CheckedLoader`);
    with ``drop_last`` (training) the next decodable sample takes its place, so batches keep
    their size.
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
    return CheckedLoader(
        dataset,
        skips=skips,
        batch_size=batch_size,
        sampler=ResumableSampler(size, batch_size, shuffle=shuffle, seed=seed),
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
