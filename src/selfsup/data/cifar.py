"""CIFAR-10 from a directory: the lossless ``cifar10.npz``, the official python tarball, or the
tarball's extracted ``cifar-10-batches-py/``.

The official batches are pickles, and unpickling runs whatever the file tells it to. They are
read with :class:`RestrictedUnpickler`, which resolves only the few numpy globals an array
needs; anything else is refused. The tarball is read member by member in memory, never
extracted, and an archive holding a member that could escape a target directory (absolute
path, ``..``), a link or a device is refused outright. So is an archive (tarball or npz) that
would unpack to more than :data:`MAX_ARCHIVE_BYTES` or hold more than
:data:`MAX_ARCHIVE_MEMBERS` members: both are read from the headers, before any data.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from selfsup.errors import DataError

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
NPZ_NAME = "cifar10.npz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
# CIFAR-10 unpacks to about 185 MB in 8 members (tarball) or 7 arrays (npz); anything far larger
# is not CIFAR-10, and reading it whole into memory (as these readers do) could exhaust it.
MAX_ARCHIVE_BYTES = 1 << 30
MAX_ARCHIVE_MEMBERS = 1000


@dataclass
class CifarArrays:
    """Train and test images (N, 3, H, W) uint8 CHW, labels int64, class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals that rebuild plain numpy arrays, under the module names numpy 1 and 2 pickle."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer  # pickle protocol 5
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dicts, lists, strings and numbers, nothing else.

    ``find_class`` is where pickle turns a name in the file into a callable; refusing every name
    but the numpy reconstruction helpers means a crafted batch cannot call ``os.system`` & co.
    """

    _allowed = _numpy_globals()

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        # latin1: the official batches were pickled by Python 2; numpy documents latin1 as the
        # encoding that restores Python 2 array payloads exactly.
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refusing to unpickle global {module}.{name}; "
                "a CIFAR batch holds only numpy arrays, lists and strings"
            ) from None


def _load_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pickled batch into (images (N, 3, 32, 32) uint8, labels int64)."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as exc:  # a corrupt pickle raises any of a dozen types from deep inside
        raise DataError(f"{source}: not a readable CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(batch).__name__}")
    # Python 2 pickles give str keys under latin1; pickles written as the CIFAR page shows give bytes.
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{source}: a CIFAR batch needs 'data' and 'labels' keys, found {sorted(map(str, batch))}")
    images = batch["data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        shape = getattr(images, "shape", None)
        raise DataError(f"{source}: 'data' must be a uint8 array (N, 3072), got {type(images).__name__} {shape}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: 'labels' is not a list of ints") from exc
    if len(labels) != len(images):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
    # The rows are already channel-major (1024 R, 1024 G, 1024 B): a reshape gives CHW.
    return images.reshape(-1, 3, 32, 32), labels


def _join_batches(batches: dict[str, tuple[np.ndarray, np.ndarray]], where: str) -> CifarArrays:
    missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if name not in batches]
    if missing:
        raise DataError(f"{where}: missing CIFAR batches {', '.join(missing)}")
    x_train = np.concatenate([batches[name][0] for name in TRAIN_BATCHES])
    y_train = np.concatenate([batches[name][1] for name in TRAIN_BATCHES])
    x_test, y_test = batches[TEST_BATCH]
    return _checked(CifarArrays(x_train, y_train, x_test, y_test, CIFAR10_CLASSES), where)


def _checked(arrays: CifarArrays, where: str) -> CifarArrays:
    for split, labels in (("train", arrays.y_train), ("test", arrays.y_test)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(arrays.classes)):
            raise DataError(
                f"{where}: {split} labels must be in 0..{len(arrays.classes) - 1}, "
                f"found {labels.min()}..{labels.max()}"
            )
    return arrays


def read_batches_dir(directory: Path) -> CifarArrays:
    """Read the extracted ``cifar-10-batches-py/`` (data_batch_1..5 and test_batch)."""
    batches = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = directory / name
        if not path.is_file():
            raise DataError(f"{directory}: missing CIFAR batch {name}")
        batches[name] = _load_batch(path.read_bytes(), str(path))
    return _join_batches(batches, str(directory))


def check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a member that extraction could turn against the file system."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise DataError(f"{archive}: refusing archive, member {member.name!r} escapes its directory")
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise DataError(f"{archive}: refusing archive, member {member.name!r} is a {kind}")
    data_filter = getattr(tarfile, "data_filter", None)  # Python >= 3.12, 3.11.4, 3.10.12
    if data_filter is not None:  # a second opinion: the filter tarfile applies on extraction
        try:
            data_filter(member, str(archive.parent))
        except tarfile.FilterError as exc:
            raise DataError(f"{archive}: refusing archive, member {member.name!r}: {exc}") from None


def _refuse_oversized(archive: Path, members: int, unpacked: int) -> None:
    if members > MAX_ARCHIVE_MEMBERS or unpacked > MAX_ARCHIVE_BYTES:
        raise DataError(
            f"{archive}: refusing archive, it holds more than {MAX_ARCHIVE_MEMBERS} members or "
            f"unpacks to more than {MAX_ARCHIVE_BYTES} bytes (at least {members} members, "
            f"{unpacked} bytes); CIFAR-10 is about 185 MB")


def read_archive(archive: Path) -> CifarArrays:
    """Read the batches straight out of ``cifar-10-python.tar.gz``, without extracting it.

    One pass over the stream (a gzip cannot seek back cheaply). Nothing touches the disk, and a
    doctored member anywhere fails the whole archive.
    """
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    wanted = {*TRAIN_BATCHES, TEST_BATCH}
    members = unpacked = 0
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                check_tar_member(member, archive)
                members, unpacked = members + 1, unpacked + member.size
                _refuse_oversized(archive, members, unpacked)  # from the header, before reading
                name = PurePosixPath(member.name).name
                if not member.isfile() or name not in wanted:
                    continue
                if name in batches:
                    raise DataError(f"{archive}: batch {name} appears twice")
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file always has a handle
                batches[name] = _load_batch(handle.read(), f"{archive}:{member.name}")
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:  # EOFError: a truncated gzip stream
        raise DataError(f"{archive}: not a readable tar archive ({type(exc).__name__}: {exc})") from exc
    return _join_batches(batches, str(archive))


def read_npz(path: Path) -> CifarArrays:
    """Read ``cifar10.npz`` (x_train, y_train, x_test, y_test uint8 HWC; classes) without pickle.

    Images are transposed once to CHW here, so a sample costs an index and a copy later.
    """
    try:
        with zipfile.ZipFile(path) as archive:  # sizes from the central directory, before data
            infos = archive.infolist()
            _refuse_oversized(path, len(infos), sum(info.file_size for info in infos))
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)} (found {', '.join(npz.files)})")
            arrays = {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}
            classes = tuple(str(c) for c in npz["classes"]) if "classes" in npz.files else CIFAR10_CLASSES
    except DataError:
        raise
    except (OSError, ValueError, MemoryError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise DataError(f"{path}: x_{split} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} must be {len(x)} integer labels, got {y.dtype} {y.shape}")
        out[f"x_{split}"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        out[f"y_{split}"] = y.astype(np.int64)
    return _checked(CifarArrays(**out, classes=classes), str(path))


def read_cifar10_dir(directory: Path) -> CifarArrays:
    """Read CIFAR-10 from ``directory``, preferring the npz, then the extracted batches, then
    the tarball (the order of cheapest to read)."""
    if (directory / NPZ_NAME).is_file():
        return read_npz(directory / NPZ_NAME)
    if (directory / BATCHES_DIR).is_dir():
        return read_batches_dir(directory / BATCHES_DIR)
    if (directory / ARCHIVE_NAME).is_file():
        return read_archive(directory / ARCHIVE_NAME)
    raise DataError(
        f"{directory}: no CIFAR-10 found; expected {NPZ_NAME}, {BATCHES_DIR}/ or {ARCHIVE_NAME} "
        "(pass download=True to fetch the archive)"
    )
