"""Datasets listed in a CSV file: ``csv:FILE`` (images and class names), and captions files.

A list file is UTF-8 CSV with a header row. ``path`` is an image file, relative to the CSV's
folder or absolute; an image list may add ``label`` (a class name: classes sorted by name, as
for folders, and every row then needs one); a captions file has ``path,caption``. Each row is
checked as it is read: the right number of fields, a non-empty path (and label or caption),
valid UTF-8, and an image file that exists (a cheap ``os.path.exists``, no decoding). A problem
is a DataError naming the file, the line and what is wrong; given a :class:`SkipLog`, the row
is recorded there and left out instead. A header without ``path``, or with unknown columns, is
always an error.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.data.dataset import UNLABELED, SkipLog
from selfsup.data.folder import ImageFileDataset
from selfsup.errors import DataError

IMAGE_LIST_COLUMNS = ("path", "label")
CAPTIONS_COLUMNS = ("path", "caption")
CAPTIONS_FILE = "captions.csv"


def _has_undecodable_bytes(text: str) -> bool:
    # Bytes that are not UTF-8 were decoded with "surrogateescape", as lone surrogates.
    return any("\udc80" <= char <= "\udcff" for char in text)


def _read_rows(csv_path: Path, columns: tuple[str, ...], required: tuple[str, ...],
               skips: SkipLog | None) -> tuple[tuple[str, ...], list[dict[str, str]]]:
    """The header (a subset of ``columns`` holding ``path``) and the rows that pass every check.

    Every column in the header must be non-empty in every row; ``required`` columns must be in
    the header.
    """
    try:
        raw = csv_path.read_bytes()
    except OSError as error:
        raise DataError(f"{csv_path}: cannot read list file ({error.strerror})") from None
    # Decoded row by row in effect: a bad byte spoils its own row only, and names its line.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    try:
        header = tuple(name.strip() for name in next(reader))
    except StopIteration:
        raise DataError(f"{csv_path}: empty list file; expected a header row: {','.join(columns)}") from None
    except csv.Error as error:
        raise DataError(f"{csv_path}, line 1: malformed header ({error})") from None
    missing = [name for name in required if name not in header]
    unknown = [name for name in header if name not in columns]
    if _has_undecodable_bytes(",".join(header)) or missing or unknown or len(set(header)) < len(header):
        raise DataError(f"{csv_path}, line 1: header {','.join(header)!r} is not valid; expected the "
                        f"columns {', '.join(required)} (of {', '.join(columns)}), in UTF-8, once each")

    rows: list[dict[str, str]] = []
    end_of_last = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            fields, problem = None, f"malformed CSV ({error})"
        else:
            if not fields:
                end_of_last = reader.line_num
                continue  # a blank line
            problem = _row_problem(fields, header, csv_path.parent)
        line, end_of_last = end_of_last + 1, reader.line_num
        if problem is None:
            rows.append(dict(zip(header, (field.strip() for field in fields))))
            continue
        problem = f"{csv_path}, line {line}: {problem}"
        if skips is None:
            raise DataError(problem)
        skips.add(problem)
    return header, rows


def _row_problem(fields: list[str], header: tuple[str, ...], folder: Path) -> str | None:
    """What is wrong with a non-blank row, in a phrase; None when nothing is."""
    if len(fields) != len(header):
        return f"{len(fields)} fields, expected {len(header)} ({','.join(header)})"
    if _has_undecodable_bytes("".join(fields)):
        return "not valid UTF-8 text"
    empty = [name for name, field in zip(header, fields) if not field.strip()]
    if empty:
        return f"empty {', '.join(empty)}"
    path = folder / fields[header.index("path")].strip()  # an absolute path stays itself
    if not os.path.exists(path):
        return f"image file {path} does not exist"
    return None


def _image_dataset(csv_path: Path, rows: list[dict[str, str]], labels: np.ndarray, image_size: int) -> ImageFileDataset:
    if not rows:
        raise DataError(f"{csv_path}: no usable rows (the header is followed by no image)")
    files = np.array([os.fsencode(row["path"]) for row in rows])
    return ImageFileDataset(csv_path.parent, files, labels, image_size)


def read_image_list(csv_path: Path, image_size: int,
                    skips: SkipLog | None = None) -> tuple[ImageFileDataset, tuple[str, ...]]:
    """The images listed in ``csv_path`` and their class names (none without a label column)."""
    header, rows = _read_rows(csv_path, IMAGE_LIST_COLUMNS, ("path",), skips)
    if "label" not in header:
        return _image_dataset(csv_path, rows, np.full(len(rows), UNLABELED), image_size), ()
    names = tuple(sorted({row["label"] for row in rows}))
    label_of = {name: label for label, name in enumerate(names)}
    labels = np.array([label_of[row["label"]] for row in rows], dtype=np.int64)
    return _image_dataset(csv_path, rows, labels, image_size), names


@dataclass
class CaptionedImages:
    """Image-text pairs: ``images`` (unlabeled) and ``captions[i]``, the text of image i."""

    images: ImageFileDataset
    captions: np.ndarray  # str (N,)


def read_captions(csv_path: Path, image_size: int, skips: SkipLog | None = None) -> CaptionedImages:
    """The image-caption pairs of a ``path,caption`` file (``captions.csv`` beside a folder)."""
    _, rows = _read_rows(csv_path, CAPTIONS_COLUMNS, CAPTIONS_COLUMNS, skips)
    images = _image_dataset(csv_path, rows, np.full(len(rows), UNLABELED), image_size)
    return CaptionedImages(images, np.array([row["caption"] for row in rows]))
