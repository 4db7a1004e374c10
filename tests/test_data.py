"""Tests of selfsup.data: sources, splits, safety of the readers, downloads and the loader."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from selfsup.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    SOURCES,
    DataSplits,
    build_loader,
    download_cifar10,
    load_data,
)
from selfsup.data import download as download_module
from selfsup.data import folder as folder_module
from selfsup.errors import DataError

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
PER_BATCH = 20  # tiny CIFAR batches: 5 train batches + 1 test batch of 20 images


# --------------------------------------------------------------------------- helpers


def image_hashes(dataset) -> set[bytes]:
    return {hashlib.sha1(dataset[i][0].numpy().tobytes()).digest() for i in range(len(dataset))}


def all_items(dataset) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    labels = np.array([dataset[i][1] for i in range(len(dataset))])
    return images, labels


@pytest.fixture(scope="module")
def tiny_cifar() -> dict[str, np.ndarray]:
    """Random CIFAR-shaped data: CHW uint8 images, labels cycling over the 10 classes."""
    rng = np.random.default_rng(123)
    x = rng.integers(0, 256, size=(6 * PER_BATCH, 3, 32, 32), dtype=np.uint8)
    y = np.arange(6 * PER_BATCH) % 10
    train, test = slice(0, 5 * PER_BATCH), slice(5 * PER_BATCH, None)
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def batch_payloads(data: dict[str, np.ndarray]) -> dict[str, dict]:
    """The batches as the official pickles hold them: b'data' (N, 3072) uint8, b'labels' list."""
    batches = {}
    for i in range(5):
        rows = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        batches[f"data_batch_{i + 1}"] = {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"data": data["x_train"][rows].reshape(PER_BATCH, 3072),
            b"labels": [int(v) for v in data["y_train"][rows]],
        }
    batches["test_batch"] = {
        b"batch_label": b"testing batch 1 of 1",
        b"data": data["x_test"].reshape(-1, 3072),
        b"labels": [int(v) for v in data["y_test"]],
    }
    return batches


def python2_pickle(payload: dict) -> bytes:
    """A batch as Python 2 and numpy 1 pickled the official files: protocol 2, keys and the
    array's bytes as Python 2 ``str``, globals under ``numpy.core``. Written opcode by opcode,
    since Python 3 cannot produce a Python 2 ``str``."""

    def text(value: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(value)]) + value

    def integer(value: int) -> bytes:  # BININT1 / BININT2
        return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)

    data = payload[b"data"]
    raw = data.tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + b"\x85" + text(b"b") + b"\x87R"
        + b"(" + integer(1) + integer(data.shape[0]) + integer(data.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + text(b"u1") + integer(0) + integer(1) + b"\x87R"
        + b"(" + integer(3) + text(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + integer(0) + b"tb"
        + b"\x89" + b"T" + struct.pack("<I", len(raw)) + raw + b"tb"
    )  # fmt: skip
    labels = b"](" + b"".join(integer(v) for v in payload[b"labels"]) + b"e"
    return (
        b"\x80\x02}(" + text(b"batch_label") + text(payload[b"batch_label"])
        + text(b"data") + array + text(b"labels") + labels + b"u."
    )  # fmt: skip


def write_batches(directory: Path, data: dict[str, np.ndarray]) -> Path:
    """Write ``cifar-10-batches-py/``: some batches in the originals' Python 2 form, the others
    pickled by Python 3 with protocols 2 to 5 (numpy arrays pickle differently under each)."""
    out = directory / "cifar-10-batches-py"
    out.mkdir(parents=True)
    for (name, payload), protocol in zip(batch_payloads(data).items(), ("py2", 2, 3, 4, 5, "py2")):
        blob = python2_pickle(payload) if protocol == "py2" else pickle.dumps(payload, protocol=protocol)
        (out / name).write_bytes(blob)
    return out


def write_archive(directory: Path, data: dict[str, np.ndarray], extra: list[tarfile.TarInfo] = ()) -> Path:
    """Write ``cifar-10-python.tar.gz`` holding the batches (and any ``extra`` members)."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in batch_payloads(data).items():
            blob = python2_pickle(payload)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return archive


def write_npz(directory: Path, data: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cifar10.npz"
    np.savez_compressed(
        path,
        x_train=data["x_train"].transpose(0, 2, 3, 1),
        y_train=data["y_train"].astype(np.uint8),
        x_test=data["x_test"].transpose(0, 2, 3, 1),
        y_test=data["y_test"].astype(np.uint8),
        classes=np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]),
    )
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serve ``tmp_path/served`` on 127.0.0.1 (ephemeral port); yield (dir, base URL, requests)."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []
    handler = type("Handler", (QuietHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- embedded sample


def test_sample_loads_by_name_with_balanced_splits_of_the_expected_sizes():
    splits = load_data("cifar10-sample")
    assert isinstance(splits, DataSplits)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4500, 500, 1000)
    assert np.bincount(splits.train.labels).tolist() == [450] * 10
    assert np.bincount(splits.val.labels).tolist() == [50] * 10
    assert np.bincount(splits.test.labels).tolist() == [100] * 10
    info = splits.info
    assert info.name == "cifar10-sample" and info.num_classes == 10 and info.image_size == 32
    assert info.class_names[0] == "airplane" and info.class_names[-1] == "truck"
    assert info.num_train == 4500
    assert info.mean == CIFAR10_MEAN and info.std == CIFAR10_STD


def test_sample_file_is_small_and_needs_no_pickle():
    path = Path(__file__).resolve().parents[1] / "src" / "selfsup" / "data" / "assets" / "cifar10_sample.npz"
    assert path.stat().st_size < 20 * 1024 * 1024
    with np.load(path, allow_pickle=False) as npz:
        assert npz["x_train"].shape == (5000, 32, 32, 3) and npz["x_train"].dtype == np.uint8
        assert npz["x_test"].shape == (1000, 32, 32, 3)
        assert npz["classes"].dtype.kind == "U"


def test_sample_items_are_uint8_chw_and_indexed_from_zero_in_each_split():
    splits = load_data("cifar10-sample")
    for dataset in (splits.train, splits.val, splits.test):
        image, label, index = dataset[len(dataset) - 1]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert isinstance(label, int) and 0 <= label < 10
        assert index == len(dataset) - 1
        seen = torch.cat([batch.index for batch in build_loader(dataset, 128, shuffle=True, drop_last=False)])
        assert sorted(seen.tolist()) == list(range(len(dataset)))


def test_items_are_copies_so_writing_to_them_leaves_the_dataset_intact():
    dataset = load_data("cifar10-sample").train
    before = dataset[0][0].clone()
    dataset[0][0].zero_()
    assert torch.equal(dataset[0][0], before)


def test_validation_split_is_fixed_by_the_seed():
    first = image_hashes(load_data("cifar10-sample", seed=0).val)
    again = image_hashes(load_data("cifar10-sample", seed=0).val)
    other = image_hashes(load_data("cifar10-sample", seed=1).val)
    assert first == again
    assert first != other


def test_train_and_val_are_disjoint_and_cover_the_train_pool():
    splits = load_data("cifar10-sample", val_fraction=0.2, seed=3)
    train, val = image_hashes(splits.train), image_hashes(splits.val)
    assert not train & val
    assert len(train) + len(val) == 5000
    assert len(val) == 1000


def test_image_size_resizes_in_the_worker():
    splits = load_data("cifar10-sample", image_size=48)
    assert splits.info.image_size == 48
    assert splits.train[0][0].shape == (3, 48, 48)


# --------------------------------------------------------------------------- cifar10:DIR


def test_cifar_dir_reads_npz_archive_and_extracted_batches_identically(tmp_path, tiny_cifar):
    write_npz(tmp_path / "npz", tiny_cifar)
    write_archive(tmp_path / "tar", tiny_cifar)
    write_batches(tmp_path / "batches", tiny_cifar)
    results = {}
    for kind in ("npz", "tar", "batches"):
        splits = load_data(f"cifar10:{tmp_path / kind}", val_fraction=0.0)
        assert splits.info.name == "cifar10" and splits.info.num_classes == 10
        results[kind] = [all_items(splits.train), all_items(splits.test)]
    for kind in ("npz", "tar", "batches"):
        (x_train, y_train), (x_test, y_test) = results[kind]
        np.testing.assert_array_equal(x_train, tiny_cifar["x_train"])
        np.testing.assert_array_equal(y_train, tiny_cifar["y_train"])
        np.testing.assert_array_equal(x_test, tiny_cifar["x_test"])
        np.testing.assert_array_equal(y_test, tiny_cifar["y_test"])


class RunsShellCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsExec:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return exec, (f"open({self.command.split()[-1]!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [RunsShellCommand, CallsExec])
def test_restricted_unpickler_refuses_a_batch_that_would_run_code(tmp_path, tiny_cifar, payload):
    batches = write_batches(tmp_path, tiny_cifar)
    marker = tmp_path / "pwned"
    evil = {b"data": payload(f"touch {marker}"), b"labels": [0]}
    (batches / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match="data_batch_3"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_a_corrupt_batch_is_a_data_error_naming_it(tmp_path, tiny_cifar):
    batches = write_batches(tmp_path, tiny_cifar)
    (batches / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_data(f"cifar10:{tmp_path}")


def _escaping_members(outside: Path) -> dict[str, tarfile.TarInfo]:
    parent = tarfile.TarInfo("../evil")
    parent.size = 4
    absolute = tarfile.TarInfo(str(outside / "evil_absolute"))
    absolute.size = 4
    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside / "evil_link")
    device = tarfile.TarInfo("cifar-10-batches-py/dev")
    device.type = tarfile.CHRTYPE
    return {"parent": parent, "absolute": absolute, "symlink": link, "device": device}


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "device"])
def test_archive_with_a_member_escaping_its_directory_is_refused(tmp_path, tiny_cifar, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    member = _escaping_members(outside)[kind]
    data_dir = tmp_path / "data" / "cifar"
    archive = write_archive(data_dir, tiny_cifar, extra=[member])
    with pytest.raises(DataError, match="refusing archive") as error:
        load_data(f"cifar10:{data_dir}")
    assert str(archive) in str(error.value)
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-python.tar.gz"]
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "data" / "evil").exists()


def test_a_truncated_archive_is_a_data_error_naming_it(tmp_path, tiny_cifar):
    archive = write_archive(tmp_path, tiny_cifar)
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_data(f"cifar10:{tmp_path}")


@pytest.mark.skipif(not (SHARED_CIFAR / "cifar10.npz").is_file(), reason="../shared/data/cifar10 not present")
def test_full_cifar10_from_shared_data_has_the_published_train_mean():
    splits = load_data(f"cifar10:{SHARED_CIFAR}", val_fraction=0.1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45000, 5000, 10000)
    pool = splits.train.images  # the shared (N, 3, 32, 32) array behind train and val
    mean = pool.reshape(len(pool), 3, -1).mean(axis=(0, 2)) / 255
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=1e-4)


# --------------------------------------------------------------------------- download


def test_download_fetches_verifies_and_loads_then_is_not_fetched_again(tmp_path, tiny_cifar, http_root, monkeypatch):
    served, base_url, requests = http_root
    archive = write_archive(served, tiny_cifar)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(download_module, "CIFAR10_URL", f"{base_url}/cifar-10-python.tar.gz")
    monkeypatch.setattr(download_module, "CIFAR10_MD5", md5)
    target = tmp_path / "fresh"
    splits = load_data(f"cifar10:{target}", download=True, val_fraction=0.0)
    np.testing.assert_array_equal(all_items(splits.test)[0], tiny_cifar["x_test"])
    assert (target / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert not (target / "cifar-10-python.tar.gz.part").exists()
    assert len(requests) == 1
    load_data(f"cifar10:{target}", download=True)
    assert len(requests) == 1


def test_download_with_a_wrong_md5_raises_and_leaves_no_archive(tmp_path, tiny_cifar, http_root):
    served, base_url, _ = http_root
    archive = write_archive(served, tiny_cifar)
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    url, wrong = f"{base_url}/cifar-10-python.tar.gz", "0" * 32
    target = tmp_path / "fresh"
    with pytest.raises(DataError) as error:
        download_cifar10(target, url=url, md5=wrong, progress=False)
    message = str(error.value)
    assert url in message and wrong in message and actual in message
    assert list(target.iterdir()) == []


def test_download_of_a_missing_url_is_a_data_error_naming_it(tmp_path, http_root):
    _, base_url, _ = http_root
    url = f"{base_url}/nothing-here.tar.gz"
    target = tmp_path / "fresh"
    with pytest.raises(DataError, match="nothing-here"):
        download_cifar10(target, url=url, md5="0" * 32, progress=False)
    assert list(target.iterdir()) == []


# --------------------------------------------------------------------------- folder:DIR


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def _gradient(size: tuple[int, int]) -> Image.Image:
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    planes = [np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1))]
    return Image.fromarray(np.concatenate([*planes, np.full((height, width, 1), 90, np.uint8)], axis=2))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two classes of images in many modes, formats and sizes."""
    root = tmp_path / "pets"
    cat, dog = root / "cat", root / "dog"
    _save(cat / "rgb.png", _gradient((40, 30)))
    _save(cat / "photo.jpg", _gradient((50, 64)), quality=90)
    _save(cat / "alpha.png", _gradient((33, 33)).convert("RGBA"))
    _save(cat / "gray.png", _gradient((20, 70)).convert("L"))
    _save(cat / "palette.gif", _gradient((64, 18)).convert("P"))
    _save(dog / "cmyk.jpeg", _gradient((25, 40)).convert("CMYK"))
    _save(dog / "deep.png", Image.fromarray((np.arange(30 * 30).reshape(30, 30) * 70).astype(np.uint16)))
    _save(dog / "bitmap.bmp", _gradient((16, 16)))
    _save(dog / "scan.tiff", _gradient((24, 31)))
    _save(dog / "nested" / "more.ppm", _gradient((45, 21)))
    if features.check("webp"):
        _save(dog / "web.webp", _gradient((36, 28)))
    (dog / "notes.txt").write_text("not an image, ignored")
    return root


def test_folder_decodes_every_mode_and_format_to_rgb_uint8_at_image_size(image_folder):
    splits = load_data(f"folder:{image_folder}", image_size=16, val_fraction=0.0)
    assert splits.info.class_names == ("cat", "dog") and splits.info.num_classes == 2
    assert splits.info.image_size == 16 and splits.info.name == "pets"
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total == len(list(image_folder.rglob("*"))) - len(list(image_folder.rglob("*.txt"))) - 3  # 3 dirs
    for dataset in (splits.train, splits.test):
        for i in range(len(dataset)):
            image, label, index = dataset[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
            assert label in (0, 1) and index == i


def test_folder_resizes_the_shorter_side_and_keeps_the_center(tmp_path):
    strip = np.zeros((20, 60, 3), dtype=np.uint8)
    strip[:, :20] = (255, 0, 0)
    strip[:, 20:40] = (0, 255, 0)
    strip[:, 40:] = (0, 0, 255)
    root = tmp_path / "strips"
    _save(root / "only" / "a.png", Image.fromarray(strip))
    _save(root / "only" / "b.png", Image.fromarray(strip))
    image = load_data(f"folder:{root}", image_size=16, val_fraction=0.0).train[0][0]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[:, :, 2:-2], torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None].expand(3, 16, 12))


def test_folder_decompression_bomb_is_a_data_error_naming_the_file(image_folder, monkeypatch):
    monkeypatch.setattr(folder_module, "MAX_IMAGE_PIXELS", 40 * 40)
    splits = load_data(f"folder:{image_folder}", image_size=16, val_fraction=0.0)
    dataset = splits.train
    big = next(i for i in range(len(dataset)) if dataset.path(i).name == "photo.jpg")  # 50 x 64
    with pytest.raises(DataError, match=r"photo\.jpg.*decompression bomb"):
        dataset[big]


def test_folder_without_split_folders_carves_a_fixed_stratified_test_split(tmp_path):
    root = tmp_path / "pool"
    for cls in ("a", "b"):
        for i in range(20):
            _save(root / cls / f"{i:02d}.png", Image.new("RGB", (8, 8), (i, 0, 0)))
    first = load_data(f"folder:{root}", image_size=8, seed=0)
    other_seed = load_data(f"folder:{root}", image_size=8, seed=5)
    assert np.bincount(first.test.labels).tolist() == [2, 2]
    assert np.bincount(first.val.labels).tolist() == [2, 2]
    assert len(first.train) == 32
    # The test split does not move with the seed; the validation split does.
    assert [first.test.path(i) for i in range(4)] == [other_seed.test.path(i) for i in range(4)]
    assert {first.val.path(i) for i in range(4)} != {other_seed.val.path(i) for i in range(4)}
    test_files = {first.test.path(i) for i in range(len(first.test))}
    train_files = {first.train.path(i) for i in range(len(first.train))}
    assert not test_files & train_files


def test_folder_with_train_and_test_folders_uses_them_with_the_train_classes(tmp_path):
    root = tmp_path / "split"
    for cls in ("ant", "bee", "cow"):
        for i in range(4):
            _save(root / "train" / cls / f"{i}.png", Image.new("RGB", (10, 12), (9, 9, 9)))
    _save(root / "test" / "cow" / "0.png", Image.new("RGB", (10, 12)))
    splits = load_data(f"folder:{root}", image_size=8, val_fraction=0.25)
    assert splits.info.class_names == ("ant", "bee", "cow")
    assert splits.test.labels.tolist() == [2]
    assert (len(splits.train), len(splits.val)) == (9, 3)
    _save(root / "test" / "yak" / "0.png", Image.new("RGB", (10, 12)))
    with pytest.raises(DataError, match="yak"):
        load_data(f"folder:{root}")


def test_folder_of_images_without_class_folders_is_unlabeled(tmp_path):
    root = tmp_path / "flat"
    for i in range(10):
        _save(root / f"{i}.png", Image.new("RGB", (12, 12)))
    splits = load_data(f"folder:{root}", image_size=8)
    assert splits.info.num_classes == 0 and splits.info.class_names == ()
    assert splits.train[0][1] == -1
    assert len(splits.train) + len(splits.val) + len(splits.test) == 10


# --------------------------------------------------------------------------- loader


def test_build_loader_with_the_same_seed_gives_the_same_order():
    dataset = load_data("cifar10-sample").val

    def order(seed: int, epochs: int = 2) -> list[list[int]]:
        loader = build_loader(dataset, 64, shuffle=True, drop_last=True, seed=seed)
        return [torch.cat([b.index for b in loader]).tolist() for _ in range(epochs)]

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert first[0] != first[1]  # each epoch is reshuffled


def test_build_loader_batches_are_uint8_images_with_int64_labels_and_indices():
    dataset = load_data("cifar10-sample").test
    loader = build_loader(dataset, 300, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [len(b.index) for b in batches] == [300, 300, 300, 100]
    images, labels, index = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (300, 3, 32, 32)
    assert labels.dtype == torch.int64 and index.dtype == torch.int64
    assert index.tolist() == list(range(300))
    assert labels.tolist() == dataset.labels[:300].tolist()
    assert len(build_loader(dataset, 300, shuffle=False, drop_last=True)) == 3


def test_build_loader_with_workers_gives_what_the_main_process_gives():
    dataset = load_data("cifar10-sample").val
    in_process = build_loader(dataset, 100, shuffle=True, drop_last=False, seed=7)
    with_workers = build_loader(dataset, 100, shuffle=True, drop_last=False, seed=7, num_workers=1)
    assert with_workers.persistent_workers
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
    del with_workers


def test_build_loader_that_would_yield_no_batch_is_a_data_error():
    dataset = load_data("cifar10-sample").val
    with pytest.raises(DataError, match="no batches"):
        build_loader(dataset, 10_000, shuffle=True, drop_last=True)


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec",
    ["foo", "cifar10:", "folder:", "imagenet:/data", "cifar10-sample:extra", "cifar10:/no/such/dir", "folder:/no/such/dir"],
)
def test_bad_spec_is_a_data_error_naming_it_and_the_accepted_forms(spec):
    with pytest.raises(DataError) as error:
        load_data(spec)
    message = str(error.value)
    assert repr(spec) in message
    for form in SOURCES:
        assert form in message


def test_cifar_dir_without_any_known_file_says_what_it_looked_for(tmp_path):
    with pytest.raises(DataError, match="cifar10.npz") as error:
        load_data(f"cifar10:{tmp_path}")
    assert str(tmp_path) in str(error.value)
