"""``load_data(spec)``: a spec string names a source; the result is train / val / test splits.

Accepted specs (see :data:`SOURCES`)::

    cifar10-sample     the sample shipped inside the package
    cifar10:DIR        DIR holds cifar10.npz, cifar-10-batches-py/ or cifar-10-python.tar.gz
    folder:DIR         images in DIR/<class>/..., or DIR/train/<class>/... and DIR/test/...
    csv:FILE           the images listed in FILE (columns path and, optionally, label)

The validation split is always carved from the train pool (stratified, with ``seed``), so
``train`` and ``val`` are disjoint and tuning never looks at ``test``. A test split carved
from a folder uses a fixed seed, whatever ``seed`` is: changing the seed must not move test
images into train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfsup.data.cifar import BATCHES_DIR, NPZ_NAME, CifarArrays, read_cifar10_dir
from selfsup.data.dataset import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayDataset,
    DataInfo,
    DataSplits,
    LabeledDataset,
    SkipLog,
    check_image_size,
    stratified_split,
)
from selfsup.data.download import download_cifar10
from selfsup.data.folder import ImageFileDataset, read_folder
from selfsup.data.listfile import read_image_list
from selfsup.data.sample import read_sample
from selfsup.errors import ConfigError, DataError

SOURCES: dict[str, str] = {
    "cifar10-sample": "the CIFAR-10 sample shipped with selfsup (500 train + 100 test images per class, 32x32)",
    "cifar10:DIR": "CIFAR-10 from DIR: cifar10.npz, cifar-10-batches-py/ or cifar-10-python.tar.gz "
    "(download=True fetches the archive)",
    "folder:DIR": "images in DIR/<class>/<image> (or DIR/train/... and DIR/test/ or DIR/val/), "
    "any format Pillow reads, resized to image_size (default 224)",
    "csv:FILE": "the images listed in FILE, a UTF-8 CSV with a header: path (relative to FILE's folder, "
    "or absolute) and an optional label (a class name); resized like folder:DIR",
}
FOLDER_IMAGE_SIZE = 224
FOLDER_TEST_FRACTION = 0.1
TEST_SPLIT_SEED = 0  # fixed on purpose: see the module docstring


def source_names() -> tuple[str, ...]:
    """The accepted spec forms, e.g. ``("cifar10-sample", "cifar10:DIR", "folder:DIR", "csv:FILE")``."""
    return tuple(SOURCES)


@dataclass
class _Source:
    """What a source provides before the validation split is carved."""

    name: str
    pool: LabeledDataset
    test: LabeledDataset
    val: LabeledDataset | None  # given by the source (folder with train/ val/ test/), else carved
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _spec_error(spec: object, why: str) -> DataError:
    forms = "; ".join(f"{form!r}: {what}" for form, what in SOURCES.items())
    return DataError(f"bad data spec {spec!r}: {why}. Accepted forms: {forms}")


def _from_arrays(name: str, arrays: CifarArrays, image_size: int | None) -> _Source:
    height, width = arrays.x_train.shape[2:]
    size = image_size if image_size is not None else min(height, width)
    return _Source(
        name=name,
        pool=ArrayDataset(arrays.x_train, arrays.y_train, image_size=size),
        test=ArrayDataset(arrays.x_test, arrays.y_test, image_size=size),
        val=None,
        class_names=arrays.classes,
        image_size=size,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


def _cifar10_dir(spec: str, directory: Path, image_size: int | None, download: bool) -> _Source:
    if download:
        has_local = (directory / NPZ_NAME).is_file() or (directory / BATCHES_DIR).is_dir()
        if not has_local:
            download_cifar10(directory)
    elif not directory.is_dir():
        raise _spec_error(spec, f"directory {directory} does not exist (pass download=True to fetch CIFAR-10)")
    return _from_arrays("cifar10", read_cifar10_dir(directory), image_size)


def _image_files(name: str, pool: ImageFileDataset, test: ImageFileDataset | None, val: ImageFileDataset | None,
                 class_names: tuple[str, ...]) -> _Source:
    """A source of image files; without a test split of its own, one is carved from the pool."""
    if test is None:
        kept, carved = stratified_split(pool.labels, FOLDER_TEST_FRACTION, TEST_SPLIT_SEED)
        pool, test = pool.subset(kept), pool.subset(carved)
    return _Source(
        name=name,
        pool=pool,
        test=test,
        val=val,
        class_names=class_names,
        image_size=pool.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def _folder(spec: str, root: Path, image_size: int | None, skips: SkipLog | None) -> _Source:
    if not root.is_dir():
        raise _spec_error(spec, f"directory {root} does not exist")
    found = read_folder(root, image_size if image_size is not None else FOLDER_IMAGE_SIZE, skips)
    return _image_files(root.resolve().name, found.pool, found.test, found.val, found.class_names)


def _csv(spec: str, csv_path: Path, image_size: int | None, skips: SkipLog | None) -> _Source:
    if not csv_path.is_file():
        raise _spec_error(spec, f"file {csv_path} does not exist")
    pool, names = read_image_list(csv_path, image_size if image_size is not None else FOLDER_IMAGE_SIZE, skips)
    return _image_files(csv_path.stem, pool, None, None, names)


def load_data(
    spec: str,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    skips: SkipLog | None = None,
) -> DataSplits:
    """Load the dataset named by ``spec`` as train / val / test splits.

    Args:
        spec: ``"cifar10-sample"``, ``"cifar10:DIR"``, ``"folder:DIR"`` or ``"csv:FILE"``
            (see :data:`SOURCES`).
        image_size: side of the square images yielded; default 32 for CIFAR, 224 for folders.
        val_fraction: share of every class moved from the train pool to ``val`` (0 for none).
            Ignored when a folder brings its own ``val/`` beside ``train/`` and ``test/``.
        seed: seeds the validation split only; the same seed gives the same split.
        download: for ``cifar10:DIR``, fetch the official archive into DIR when no copy is
            there (verified by MD5; see :mod:`selfsup.data.download`).
        skips: with ``data.skip_bad``, where an empty class folder or a bad or missing row of a
            list file is recorded and left out; without it (None), such a problem is a DataError.

    Every split yields ``(uint8 image (3, S, S), label, index)`` with index 0..len-1.
    Raises DataError naming the spec, directory or file at fault.
    """
    check_image_size(image_size)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not isinstance(spec, str):
        raise _spec_error(spec, "a spec is a string")
    name, has_argument, argument = spec.partition(":")
    if name == "cifar10-sample" and not has_argument:
        source = _from_arrays("cifar10-sample", read_sample(), image_size)
    elif name == "cifar10" and argument:
        source = _cifar10_dir(spec, Path(argument).expanduser(), image_size, download)
    elif name == "folder" and argument:
        source = _folder(spec, Path(argument).expanduser(), image_size, skips)
    elif name == "csv" and argument:
        source = _csv(spec, Path(argument).expanduser(), image_size, skips)
    elif name in ("cifar10", "folder", "csv"):
        form = next(form for form in SOURCES if form.startswith(f"{name}:"))
        raise _spec_error(spec, f"{name} needs an argument, as in {form!r}")
    else:
        raise _spec_error(spec, f"unknown source {name!r}")

    if source.val is not None:
        train, val = source.pool, source.val
    else:
        kept, carved = stratified_split(source.pool.labels, float(val_fraction), seed)
        train, val = source.pool.subset(kept), source.pool.subset(carved)
    info = DataInfo(
        name=source.name,
        num_classes=len(source.class_names),
        class_names=source.class_names,
        image_size=source.image_size,
        mean=source.mean,
        std=source.std,
        num_train=len(train),
    )
    return DataSplits(train=train, val=val, test=source.test, info=info)
