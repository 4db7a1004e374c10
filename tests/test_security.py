"""What users load cannot run code or write outside its place: hostile fixtures, built here.

Each test builds the hostile file itself and shows that nothing ran (a marker file the payload
would create does not exist) and nothing escaped (the folders around are unchanged). Cases
already covered elsewhere, and not repeated here:

- tar members with ``..``, absolute paths, links pointing outside, device files:
  ``tests/test_data.py::test_archive_with_a_member_escaping_its_directory_is_refused``;
- a CIFAR batch pickle that would run code:
  ``tests/test_data.py::test_restricted_unpickler_refuses_a_batch_that_would_run_code``;
- a download whose MD5 does not match, served on 127.0.0.1:
  ``tests/test_data.py::test_download_with_a_wrong_md5_raises_and_leaves_no_archive``;
- YAML with ``!!python/object`` tags:
  ``tests/test_config_and_cli.py::test_yaml_with_python_tags_is_refused_without_constructing_anything``.
"""

from __future__ import annotations

import ast
import gc
import gzip
import http.server
import io
import json
import os
import shutil
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.checkpoint import load_checkpoint_file
from selfsup.cli import main
from selfsup.config import Config
from selfsup.data import build_loader, download_cifar10, load_data
from selfsup.data import cifar as cifar_module
from selfsup.errors import CheckpointError, DataError
from selfsup.export import load_backbone, read_export_metadata
from selfsup.train import build_pretraining_method

SOURCE = Path(__file__).resolve().parents[1] / "src" / "selfsup"
TINY = ["--data", "cifar10-sample", "--backbone", "resnet18", "--width", "0.125",
        "--batch-size", "32", "--max-steps", "2", "--no-eval", "--num-workers", "0",
        "--set", "eval.monitor_every_n_epochs=0", "--set", "train.progress_bar=false",
        "--method", "mocov2", "--set", "method_args.queue_size=64"]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time: a before/after snapshot."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A two-step MoCo v2 run (its backbone has split BN), trained from an empty working folder;
    the working folder must hold nothing but the run's ``--out`` afterwards."""
    cwd = tmp_path_factory.mktemp("cwd")
    before = Path.cwd()
    os.chdir(cwd)
    try:
        assert main(["train", "--out", "run", *TINY]) == 0
    finally:
        os.chdir(before)
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    return cwd / "run"


# --------------------------------------------------------------------------- checkpoints


class RunsCode:
    """Unpickling this calls ``exec``, which creates ``marker``: the classic hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def hostile_checkpoint(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "downloaded.ckpt"
    torch.save({"state_dict": {"method.backbone.conv1.weight": RunsCode(marker)},
                "hyper_parameters": {"config": {}, "data_info": {}}}, path)
    return path, marker


def test_the_hostile_checkpoint_runs_code_when_unpickled_without_weights_only(hostile_checkpoint):
    path, marker = hostile_checkpoint  # the fixture is real: an unsafe load runs its payload
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["eval", "embed", "export", "resume"])
def test_cli_refuses_a_pickled_checkpoint_naming_it_and_runs_nothing(command, hostile_checkpoint,
                                                                     tmp_path, capsys):
    path, marker = hostile_checkpoint
    argv = {"eval": ["eval", "knn", "--checkpoint", str(path)],
            "embed": ["embed", "--checkpoint", str(path), "--data", "cifar10-sample",
                      "--out", str(tmp_path / "features.npy")],
            "export": ["export", "--checkpoint", str(path),
                       "--out", str(tmp_path / "backbone.safetensors")],
            "resume": ["train", "--resume", str(path), "--out", str(tmp_path / "run"), *TINY],
            }[command]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "arbitrary unpickling" in error and "global exec" in error
    assert not marker.exists()
    assert not (tmp_path / "features.npy").exists()
    assert not (tmp_path / "backbone.safetensors").exists()


def test_python_api_refuses_a_pickled_checkpoint_and_runs_nothing(hostile_checkpoint, tmp_path):
    path, marker = hostile_checkpoint
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_checkpoint_file(path)
    disguised = tmp_path / "backbone.safetensors"  # a pickle under an innocent name
    shutil.copy(path, disguised)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_backbone(disguised)
    assert not marker.exists()


def test_selfsup_never_unpickles_unrestricted_and_reads_yaml_safely():
    """Static check of the whole package: every ``torch.load`` passes ``weights_only=True``;
    no ``pickle.load(s)``, ``np.load(allow_pickle=True)`` or unsafe YAML loader anywhere."""
    problems = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)):
                continue
            owner, name = node.func.value.id, node.func.attr
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(SOURCE)}:{node.lineno}"
            if owner == "torch" and name == "load":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "pickle" and name in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: pickle.{name}")
            if owner in ("np", "numpy") and name == "load":
                value = keywords.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and not value.value):
                    problems.append(f"{where}: np.load with allow_pickle")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{where}: yaml.{name}")
    assert problems == []


def test_export_then_load_backbone_gives_the_checkpoints_backbone(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    target = tmp_path / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(target), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # safetensors: an 8-byte header length, a JSON header, raw bytes; nothing to unpickle.
    raw = target.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["__metadata__"] == read_export_metadata(target)
    metadata = read_export_metadata(target)
    assert (metadata["method"], metadata["backbone"]) == ("mocov2", "resnet18")
    assert json.loads(metadata["width"]) == 0.125 and json.loads(metadata["cifar_stem"]) is True
    assert json.loads(metadata["feature_dim"]) == reported["feature_dim"] == 64
    assert metadata["selfsup_version"] and reported["weights"] == str(target)

    # The checkpoint's backbone, rebuilt the way `selfsup eval` does it.
    saved = load_checkpoint_file(checkpoint)
    hyper = saved["hyper_parameters"]
    method = build_pretraining_method(Config(**hyper["config"]), hyper["data_info"])
    method.load_state_dict({k[len("method."):]: v for k, v in saved["state_dict"].items()
                            if k.startswith("method.")})
    expected = method.backbone.eval()
    loaded, feature_dim = load_backbone(target)
    assert feature_dim == 64 and not loaded.training
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(images), expected(images))
    for name, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_export_writes_only_safetensors_and_load_backbone_wants_selfsup_metadata(trained_run,
                                                                                 tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err and not (tmp_path / "b.pt").exists()
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="foreign.safetensors.*not a backbone exported"):
        load_backbone(foreign)


# --------------------------------------------------------------------------- archives


def _tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_archive_declaring_more_than_the_size_limit_is_refused_before_reading(tmp_path):
    """A 2 GiB member, declared in its header: refused at the header, nothing is read."""
    header = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    header.size = 2 << 30
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / "cifar-10-python.tar.gz"
    archive.write_bytes(gzip.compress(header.tobuf(format=tarfile.GNU_FORMAT) + bytes(4096)))
    with pytest.raises(DataError, match="refusing archive.*more than") as error:
        load_data(f"cifar10:{data_dir}")
    message = str(error.value)
    assert str(archive) in message and str(cifar_module.MAX_ARCHIVE_BYTES) in message
    assert [p.name for p in data_dir.iterdir()] == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("limit", ["bytes", "members"])
def test_archive_over_a_limit_is_refused_and_nothing_is_written(tmp_path, monkeypatch, limit):
    if limit == "bytes":
        monkeypatch.setattr(cifar_module, "MAX_ARCHIVE_BYTES", 10_000)
        members = [(tarfile.TarInfo("cifar-10-batches-py/padding"), bytes(20_000))]
    else:
        monkeypatch.setattr(cifar_module, "MAX_ARCHIVE_MEMBERS", 5)
        members = [(tarfile.TarInfo(f"cifar-10-batches-py/f{i}"), b"x") for i in range(6)]
    data_dir = tmp_path / "data"
    archive = _tar_gz(data_dir / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match="refusing archive.*more than") as error:
        load_data(f"cifar10:{data_dir}")
    assert str(archive) in str(error.value)
    assert [p.name for p in data_dir.iterdir()] == ["cifar-10-python.tar.gz"]


def test_npz_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_module, "MAX_ARCHIVE_BYTES", 10_000)
    images = np.zeros((10, 32, 32, 3), np.uint8)  # 30 KB unpacked, a few hundred bytes packed
    np.savez_compressed(tmp_path / "cifar10.npz", x_train=images, y_train=np.zeros(10, np.uint8),
                        x_test=images, y_test=np.zeros(10, np.uint8))
    with pytest.raises(DataError, match=r"cifar10\.npz: refusing archive.*more than"):
        load_data(f"cifar10:{tmp_path}")


# --------------------------------------------------------------------------- downloads


@pytest.fixture
def server(monkeypatch):
    """Serve ``routes[path] = bytes`` on 127.0.0.1; ``/truncated/PATH`` sends half of PATH's
    bytes under a Content-Length that promises all of them."""
    routes: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = routes.get(self.path.removeprefix("/truncated"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.path.startswith("/truncated") else body)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    finally:
        httpd.shutdown()
        httpd.server_close()


def _md5(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


def test_a_stale_partial_download_is_never_used(tmp_path, server):
    base, routes = server
    good = b"the published archive " * 1000
    routes["/cifar.tar.gz"] = good
    target = tmp_path / "data"
    target.mkdir()
    stale = target / "cifar-10-python.tar.gz.part"  # left by an interrupted run, or planted
    stale.write_bytes(b"planted bytes that must not end up in the archive")
    archive = download_cifar10(target, url=f"{base}/cifar.tar.gz", md5=_md5(good), progress=False)
    assert archive.read_bytes() == good
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-python.tar.gz"]


def test_a_truncated_download_is_never_used(tmp_path, server):
    base, routes = server
    good = b"the published archive " * 1000
    routes["/cifar.tar.gz"] = good
    target = tmp_path / "data"
    with pytest.raises(DataError, match="expected MD5"):
        download_cifar10(target, url=f"{base}/truncated/cifar.tar.gz", md5=_md5(good),
                         progress=False)
    assert list(target.iterdir()) == []  # neither the archive nor its .part
    with pytest.raises(DataError, match="no CIFAR-10 found"):
        load_data(f"cifar10:{target}")


# --------------------------------------------------------------------------- images


def _png_bomb(side: int) -> bytes:
    """A 1-bit ``side`` x ``side`` PNG of zeros: tiny on disk, 3 * side**2 bytes as RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    rows, compressor = (b"\x00" + bytes((side + 7) // 8)) * 1000, zlib.compressobj(9)
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def _folder_with_a_bomb(root: Path, side: int):
    """A folder dataset whose train split holds two small images and a ``side``-square bomb."""
    from PIL import Image

    for name in ("train/cat/ok.png", "train/dog/ok.png", "test/cat/ok.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12)).save(root / name)
    bomb = root / "train" / "cat" / "bomb.png"
    bomb.write_bytes(_png_bomb(side))
    assert bomb.stat().st_size < 100_000  # under 100 KB on disk, >= 300 MB decoded as RGB
    return load_data(f"folder:{root}", image_size=8, val_fraction=0.0).train


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 MP (1x-2x Pillow's limit), 400 MP
def test_decompression_bomb_png_is_a_data_error_naming_the_file(tmp_path, side):
    train = _folder_with_a_bomb(tmp_path / "pets", side)
    index = next(i for i in range(len(train)) if train.path(i).name == "bomb.png")
    with pytest.raises(DataError, match=r"bomb\.png.*decompression bomb"):
        train[index]


def test_decompression_bomb_png_is_refused_inside_loader_workers_too(tmp_path):
    # The pixel bound is set when selfsup.data.folder is imported, so worker processes have it.
    # (After any worker error PyTorch takes ~5 s to shut the worker down: one case only.)
    train = _folder_with_a_bomb(tmp_path / "pets", 20_000)
    loader = build_loader(train, 1, shuffle=False, drop_last=False, num_workers=1)
    with pytest.raises(DataError, match=r"bomb\.png.*decompression bomb") as error:
        list(loader)
    del error, loader
    gc.collect()  # the worker's shutdown is paid here, not in a later test


# --------------------------------------------------------------------------- outputs


def test_train_refuses_an_out_folder_holding_an_earlier_run_and_touches_nothing(trained_run,
                                                                               capsys):
    before = _files(trained_run)
    assert main(["train", "--out", str(trained_run), *TINY]) == 2
    error = capsys.readouterr().err
    assert str(trained_run) in error and "--resume auto" in error and "--overwrite" in error
    assert _files(trained_run) == before


def test_resume_auto_on_the_same_out_continues_that_run(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    argv = ["train", "--out", str(out), "--resume", "auto", "--json", *TINY]
    argv[argv.index("--max-steps") + 1] = "3"
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3


def test_overwrite_replaces_the_earlier_run_and_leaves_other_files_alone(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step00000099.ckpt").write_bytes(b"an earlier run's checkpoint")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not selfsup's")
    (out / "logs" / "link").symlink_to(elsewhere, target_is_directory=True)
    assert main(["train", "--out", str(out), "--overwrite", *TINY]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints" / "step00000099.ckpt").exists()
    assert not (out / "logs" / "link").exists()
    assert (elsewhere / "keep.txt").read_text() == "not selfsup's"  # the link was not followed
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert load_checkpoint_file(out / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_train_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("a file")
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert str(out) in capsys.readouterr().err and out.read_text() == "a file"
