"""Bad data: every hostile input is one line naming the file (and line), or, with --skip-bad, a
counted skip; ``csv:FILE`` lists; ``selfsup check-data``. (Real decompression bombs, with their
pixel data, are in test_security.py.)"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.data import SkipLog, build_loader, load_data
from selfsup.data.folder import scan_folder
from selfsup.errors import DataError

SIZE = 16
TINY_TRAIN = ["--backbone", "resnet18", "--width", "0.125", "--batch-size", "8", "--max-steps", "2",
              "--image-size", str(SIZE), "--no-eval", "--set", "eval.monitor_every_n_epochs=0",
              "--set", "train.progress_bar=false"]


# --------------------------------------------------------------------------- hostile files


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _noise(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_claiming(side: int) -> bytes:
    """A valid-looking PNG header declaring ``side`` x ``side`` pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def hostile_bytes() -> dict[str, bytes]:
    """Files that cannot be decoded, by name: what each one is shows in its name."""
    png, jpeg = _encoded(_noise(1), "PNG"), _encoded(_noise(2), "JPEG")
    return {
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "zero_bytes.png": b"",
        "text_named.jpg": b"a shopping list, not a photo\n",
        "bomb.png": _png_claiming(50_000),  # 2.5 gigapixels declared in under 100 bytes
    }


def _write_good(folder: Path, count: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        _noise(100 + i, 20).save(folder / f"good{i:02d}.png")


def _splits_holding(spec: str, names: set[str], **options) -> dict[str, set[str]]:
    splits = load_data(spec, image_size=SIZE, **options)
    return {split: {dataset.path(i).name for i in range(len(dataset))} & names
            for split, dataset in (("train", splits.train), ("val", splits.val), ("test", splits.test))}


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """train/ with 2 classes of 9 images each (5 of them hostile), test/ with good images only,
    and an empty class folder: the train split (16 images once val takes one per class) is
    exactly two batches of 8."""
    root = tmp_path / "hostile"
    bad = hostile_bytes()
    _write_good(root / "train" / "cat", 9 - 3)
    for name in list(bad)[:3]:
        (root / "train" / "cat" / name).write_bytes(bad[name])
    _write_good(root / "train" / "dog", 9 - 2)
    for name in list(bad)[3:]:
        (root / "train" / "dog" / name).write_bytes(bad[name])
    _write_good(root / "test" / "cat", 2)
    _write_good(root / "test" / "dog", 2)
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "notes.txt").write_text("no images")
    return root


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _error_lines(capsys) -> list[str]:
    # Lightning's log handler may still hold an earlier test's (closed) captured stderr; what
    # logging prints about that is pytest's doing, not the command's.
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: .*?\n", "", capsys.readouterr().err, flags=re.DOTALL)
    assert "Traceback" not in err and "worker process" not in err
    return [line for line in err.splitlines() if line.startswith("selfsup: error:")]


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", list(hostile_bytes()))
def test_each_undecodable_file_stops_the_loader_with_one_line_naming_it(tmp_path, name):
    root = tmp_path / "pets"
    _write_good(root / "cat", 3)
    (root / "cat" / name).write_bytes(hostile_bytes()[name])
    every_image, _ = scan_folder(root, SIZE)
    with pytest.raises(DataError) as error:
        list(build_loader(every_image, 4, shuffle=False, drop_last=False))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{root / 'cat' / name}: ")
    assert ("decompression bomb" in message) == (name == "bomb.png")


def _solid(mode: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """An image in ``mode`` and the RGB colour it must decode to."""
    if mode == "CMYK":  # full cyan ink, no black: no red light, full green and blue
        return Image.new("CMYK", (24, 20), (255, 0, 0, 0)), (0, 255, 255)
    if mode == "I;16":  # a quarter of 16-bit full scale is a quarter of 8-bit full scale
        return Image.fromarray(np.full((20, 24), 16384, dtype=np.uint16)), (64, 64, 64)
    if mode == "RGBA":  # the alpha channel is dropped, not blended
        return Image.new("RGBA", (24, 20), (10, 120, 250, 40)), (10, 120, 250)
    return Image.new("L", (24, 20), 200), (200, 200, 200)


@pytest.mark.parametrize(("mode", "fmt"), [("CMYK", "JPEG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("L", "PNG")])
def test_cmyk_16_bit_rgba_and_grey_images_are_converted_to_rgb_of_the_right_colour(tmp_path, mode, fmt):
    image, rgb = _solid(mode)
    root = tmp_path / "modes" / "only"
    root.mkdir(parents=True)
    for name in ("a", "b"):
        image.save(root / f"{name}.{fmt.lower()}", fmt)
    decoded, _, _ = load_data(f"folder:{root.parent}", image_size=SIZE, val_fraction=0.0).train[0]
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, SIZE, SIZE)
    tolerance = 3 if fmt == "JPEG" else 0  # JPEG is lossy
    expected = torch.tensor(rgb, dtype=torch.int16)[:, None, None]
    assert int((decoded.to(torch.int16) - expected).abs().max()) <= tolerance


def test_with_a_skip_log_bad_samples_leave_their_batch_and_are_counted_once(tmp_path):
    root = tmp_path / "pets"
    _write_good(root / "cat", 4)
    for name, data in list(hostile_bytes().items())[:3]:
        (root / "cat" / name).write_bytes(data)
    (root / "cat" / "zz_bad.png").write_bytes(b"")
    (root / "cat" / "zz_worse.png").write_bytes(b"\x89PNG")
    dataset, _ = scan_folder(root, SIZE)
    # In name order, batches of 3: 3 good; 1 good + 2 bad; 3 bad (not yielded at all).
    skips = SkipLog()
    loader = build_loader(dataset, 3, shuffle=False, drop_last=False, skips=skips)
    for _ in range(2):  # a second epoch meets the same files: still counted once each
        batches = list(loader)
        assert [batch.images.shape[0] for batch in batches] == [3, 1]
        kept = torch.cat([batch.index for batch in batches]).tolist()
        assert [dataset.path(i).name for i in kept] == [f"good{i:02d}.png" for i in range(4)]
    bad = [str(dataset.path(i)) for i in range(len(dataset)) if not dataset.path(i).name.startswith("good")]
    assert skips.count == 5 and [problem.split(": ")[0] for problem in skips.problems()] == bad


def test_a_training_loader_keeps_batches_full_by_taking_the_next_decodable_sample(tmp_path):
    """drop_last loaders (training) replace a bad sample by the next good one after it: under DDP
    every process must gather batches of one size, and BatchNorm needs more than one sample."""
    root = tmp_path / "pets"
    _write_good(root / "cat", 4)
    (root / "cat" / "good01x.png").write_bytes(b"")  # sorts between good01 and good02
    dataset, _ = scan_folder(root, SIZE)
    names = [dataset.path(i).name for i in range(len(dataset))]
    assert names == ["good00.png", "good01.png", "good01x.png", "good02.png", "good03.png"]
    skips = SkipLog()
    loader = build_loader(dataset, 5, shuffle=False, drop_last=True, skips=skips)
    (batch,) = list(loader)
    assert [names[i] for i in batch.index.tolist()] == [
        "good00.png", "good01.png", "good02.png", "good02.png", "good03.png"]
    assert skips.count == 1 and "good01x.png" in skips.problems()[0]
    with pytest.raises(DataError, match="good01x.png"):  # without a skip log: still an error
        list(build_loader(dataset, 5, shuffle=False, drop_last=True))


# --------------------------------------------------------------------------- folders


def test_an_empty_class_folder_is_one_line_naming_it_or_a_skip(hostile_folder):
    with pytest.raises(DataError, match=r"zebra: class folder holds no images") as error:
        load_data(f"folder:{hostile_folder}")
    assert "\n" not in str(error.value)
    skips = SkipLog()
    splits = load_data(f"folder:{hostile_folder}", skips=skips)
    assert splits.info.class_names == ("cat", "dog")
    (problem,) = skips.problems()
    assert problem.startswith(f"{hostile_folder / 'train' / 'zebra'}: class folder holds no images")


# --------------------------------------------------------------------------- csv:FILE


def _csv_folder(tmp_path: Path) -> Path:
    """images/<n>.png for 10 cats and 10 dogs; the list file is written by each test."""
    _write_good(tmp_path / "images", 20)
    return tmp_path


def _good_rows(start: int = 0, stop: int = 20) -> list[str]:
    return [f"images/good{i:02d}.png,{'dog' if i % 2 else 'cat'}" for i in range(start, stop)]


def test_csv_lists_relative_and_absolute_paths_with_classes_sorted_by_name(tmp_path):
    root = _csv_folder(tmp_path)
    rows = _good_rows(0, 19) + [f"{root / 'images' / 'good19.png'},ant"]
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n\n", encoding="utf-8")
    splits = load_data(f"csv:{root / 'list.csv'}", image_size=SIZE, val_fraction=0.1)
    assert splits.info.class_names == ("ant", "cat", "dog") and splits.info.name == "list"
    seen = {}
    for dataset in (splits.train, splits.val, splits.test):
        for i in range(len(dataset)):
            image, label, _ = dataset[i]
            assert image.shape == (3, SIZE, SIZE)
            seen[dataset.path(i).name] = splits.info.class_names[label]
    assert seen == {f"good{i:02d}.png": "ant" if i == 19 else ("dog" if i % 2 else "cat") for i in range(20)}


def test_csv_without_a_label_column_is_unlabeled(tmp_path):
    root = _csv_folder(tmp_path)
    (root / "list.csv").write_text("path\n" + "\n".join(f"images/good{i:02d}.png" for i in range(20)))
    splits = load_data(f"csv:{root / 'list.csv'}", image_size=SIZE)
    assert splits.info.num_classes == 0 and set(splits.train.labels.tolist()) == {-1}


BAD_ROWS = {
    "missing_file": (b"images/nowhere.png,cat", r"image file .*images/nowhere\.png does not exist"),
    "wrong_field_count": (b"images/good00.png,cat,extra", r"3 fields, expected 2"),
    "empty_path": (b",cat", r"empty path"),
    "invalid_utf8": (b"images/good00.png,caf\xe9", r"not valid UTF-8"),
    "bad_quoting": (b'"images/good00.png"x,cat', r"malformed CSV"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_csv_row_is_one_line_naming_the_file_and_line(tmp_path, capsys, kind):
    root = _csv_folder(tmp_path)
    row, problem = BAD_ROWS[kind]
    lines = [b"path,label", *(r.encode() for r in _good_rows(0, 5)), row, *(r.encode() for r in _good_rows(5))]
    (root / "list.csv").write_bytes(b"\n".join(lines) + b"\n")
    # Through the command line: the run stops before any training, on the same one line.
    assert main(["train", "--data", f"csv:{root / 'list.csv'}", "--out", str(tmp_path / "run"), *TINY_TRAIN]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"selfsup: error: {root / 'list.csv'}, line 7: ")
    with pytest.raises(DataError, match=problem):
        load_data(f"csv:{root / 'list.csv'}")


def test_a_csv_header_without_a_path_column_names_the_file_and_the_columns(tmp_path):
    root = _csv_folder(tmp_path)
    (root / "list.csv").write_text("file,lable\nimages/good00.png,cat\n")
    with pytest.raises(DataError, match=r"list\.csv, line 1: header 'file,lable' .*path"):
        load_data(f"csv:{root / 'list.csv'}")


def test_a_csv_with_skips_leaves_out_and_records_every_bad_row(tmp_path):
    root = _csv_folder(tmp_path)
    lines = [b"path,label", *(r.encode() for r in _good_rows()), *(row for row, _ in BAD_ROWS.values())]
    (root / "list.csv").write_bytes(b"\n".join(lines) + b"\n")
    skips = SkipLog()
    splits = load_data(f"csv:{root / 'list.csv'}", image_size=SIZE, skips=skips)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20
    assert [problem.split(": ")[0] for problem in skips.problems()] == [
        f"{root / 'list.csv'}, line {line}" for line in range(22, 27)]


# --------------------------------------------------------------------------- selfsup train


def test_train_stops_at_a_bad_file_decoded_in_a_worker_with_our_one_line(tmp_path, capsys):
    root = tmp_path / "pets"
    _write_good(root / "train" / "cat", 8)
    _write_good(root / "train" / "dog", 9)
    _write_good(root / "test" / "cat", 1)
    _write_good(root / "test" / "dog", 1)
    (root / "train" / "cat" / "truncated.jpg").write_bytes(hostile_bytes()["truncated.jpg"])
    assert _splits_holding(f"folder:{root}", {"truncated.jpg"})["train"] == {"truncated.jpg"}
    code = main(["train", "--data", f"folder:{root}", "--num-workers", "1", "--out", str(tmp_path / "run"),
                 *TINY_TRAIN])
    assert code == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"selfsup: error: {root / 'train' / 'cat' / 'truncated.jpg'}: cannot decode image")


def test_train_with_skip_bad_completes_and_reports_every_skipped_file(hostile_folder, tmp_path, capsys):
    bad = set(hostile_bytes())
    assert _splits_holding(f"folder:{hostile_folder}", bad, skips=SkipLog())["train"] == bad
    assert main(["train", "--data", f"folder:{hostile_folder}", "--skip-bad", "--num-workers", "0",
                 "--out", str(tmp_path / "run"), "--json", *TINY_TRAIN]) == 0
    results = _last_json(capsys)
    assert results["steps"] == 2
    assert results["skipped_samples"] == len(bad) + 1  # and the empty class folder
    named = {Path(problem.split(": ")[0]).name for problem in results["skipped_examples"]}
    assert named == bad | {"zebra"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["skipped_samples"] == len(bad) + 1


def test_train_with_skip_bad_under_ddp_counts_the_bad_samples_of_every_process(hostile_folder, tmp_path):
    """Two gloo processes each decode half of every epoch; the count at the end is the run's."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "selfsup.cli", "train", "--data", f"folder:{hostile_folder}",
               "--skip-bad", "--num-workers", "0", "--devices", "2", "--accelerator", "cpu",
               "--out", str(tmp_path / "run"), "--json", *TINY_TRAIN, "--batch-size", "4"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    named = {Path(problem.split(": ")[0]).name for problem in results["skipped_examples"]}
    assert named == set(hostile_bytes()) | {"zebra"}


def test_train_with_skip_bad_prints_the_count_and_examples(tmp_path, capsys):
    root = _csv_folder(tmp_path)
    lines = [b"path,label", *(r.encode() for r in _good_rows()), *(row for row, _ in BAD_ROWS.values())]
    (root / "list.csv").write_bytes(b"\n".join(lines) + b"\n")
    assert main(["train", "--data", f"csv:{root / 'list.csv'}", "--skip-bad", "--num-workers", "0",
                 "--out", str(tmp_path / "run"), *TINY_TRAIN]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("skipped 5 bad samples (data.skip_bad):")
    assert [line.split(": ")[0].strip() for line in out[start + 1:start + 6]] == [
        f"{root / 'list.csv'}, line {line}" for line in range(22, 27)]


# --------------------------------------------------------------------------- selfsup check-data


def test_check_data_on_a_clean_folder_exits_0(tmp_path, capsys):
    _write_good(tmp_path / "clean" / "cat", 5)
    _write_good(tmp_path / "clean" / "dog", 5)
    assert main(["check-data", str(tmp_path / "clean"), "--image-size", str(SIZE), "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 classes (cat, dog)" in out and "0 problems found" in out
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        assert any(line.split()[:2] == [split, str(count)] for line in out.splitlines())


def test_check_data_lists_every_bad_file_and_exits_1(hostile_folder, capsys):
    # Without --skip-bad the empty class folder stops the check, as it would stop training.
    assert main(["check-data", str(hostile_folder), "--image-size", str(SIZE)]) == 2
    (line,) = _error_lines(capsys)
    assert "zebra" in line
    assert main(["check-data", str(hostile_folder), "--skip-bad", "--image-size", str(SIZE),
                 "--num-workers", "1", "--json"]) == 1
    report = _last_json(capsys)
    named = {Path(problem.split(": ")[0]).name for problem in report["problems"]}
    assert named == set(hostile_bytes()) | {"zebra"}
    assert report["splits"]["train"] == {"images": 16, "bad": 5}
    assert report["splits"]["test"] == {"images": 4, "bad": 0}


def test_check_data_validates_a_csv_and_the_captions_file_beside_a_folder(tmp_path, capsys):
    root = _csv_folder(tmp_path)
    lines = [b"path,label", *(r.encode() for r in _good_rows()), *(row for row, _ in BAD_ROWS.values())]
    (root / "list.csv").write_bytes(b"\n".join(lines) + b"\n")
    assert main(["check-data", f"csv:{root / 'list.csv'}", "--skip-bad", "--num-workers", "0", "--json"]) == 1
    assert len(_last_json(capsys)["problems"]) == len(BAD_ROWS)

    folder = tmp_path / "images"
    (folder / "captions.csv").write_bytes(
        b"path,caption\ngood00.png,a cat\ngood01.png,\xff\xfe broken\nmissing.png,a ghost\ngood02.png,\n")
    assert main(["check-data", str(folder), "--num-workers", "0"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"selfsup: error: {folder / 'captions.csv'}, line 3: not valid UTF-8")
    assert main(["check-data", str(folder), "--skip-bad", "--num-workers", "0", "--json"]) == 1
    report = _last_json(capsys)
    assert report["splits"]["captions"] == {"images": 1, "bad": 0}
    assert [problem.split(": ", 1)[1] for problem in report["problems"]] == [
        "not valid UTF-8 text", f"image file {folder / 'missing.png'} does not exist", "empty caption"]
