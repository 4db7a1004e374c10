"""``selfsup check-data``: decode every image of every split once, up front, and list every
problem, so that a long run does not meet a bad file hours in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from selfsup.data.dataset import LabeledDataset, SkipLog
from selfsup.data.listfile import CAPTIONS_FILE, read_captions
from selfsup.data.loader import build_loader
from selfsup.data.sources import FOLDER_IMAGE_SIZE, load_data

CHECK_BATCH_SIZE = 64


def check_spec(spec_or_dir: str) -> str:
    """The data spec to check: a bare directory means ``folder:DIR``."""
    return f"folder:{spec_or_dir}" if Path(spec_or_dir).is_dir() else spec_or_dir


def _decode_all(name: str, dataset: LabeledDataset, num_workers: int) -> SkipLog:
    """Decode every sample of ``dataset``; return the problems met."""
    problems = SkipLog()
    loader = build_loader(dataset, CHECK_BATCH_SIZE, shuffle=False, drop_last=False,
                          num_workers=num_workers, pin_memory=False, skips=problems)
    for _ in tqdm(loader, desc=f"checking {name}", unit="batch"):
        pass
    return problems


def check_data(spec_or_dir: str, *, image_size: int | None = None, skip_bad: bool = False,
               num_workers: int = 2) -> dict[str, Any]:
    """Decode every image of every split of a dataset, as training would, and report.

    Returns ``{"data", "classes", "splits": {split: {"images", "bad"}}, "problems"}``, each
    problem one line, ``file: what is wrong``. Undecodable images are always listed, all of
    them. A problem found while listing the files (an empty class folder, a bad or missing row
    of a list file) is a DataError, as it would be for ``train``; with ``skip_bad`` it is
    listed too, and the check goes on. A folder with a ``captions.csv`` has that file checked as
    well (rows, then its images), as split ``captions``.
    """
    spec = check_spec(spec_or_dir)
    scan = SkipLog()
    splits = load_data(spec, image_size=image_size, skips=scan if skip_bad else None)
    datasets: dict[str, LabeledDataset] = {"train": splits.train, "val": splits.val, "test": splits.test}
    kind, _, argument = spec.partition(":")
    captions_file = Path(argument).expanduser() / CAPTIONS_FILE
    if kind == "folder" and captions_file.is_file():
        size = image_size if image_size is not None else FOLDER_IMAGE_SIZE
        datasets["captions"] = read_captions(captions_file, size, scan if skip_bad else None).images
    report: dict[str, Any] = {"data": spec, "classes": list(splits.info.class_names), "splits": {}}
    problems = scan.problems()
    for name, dataset in datasets.items():
        found = _decode_all(name, dataset, num_workers).problems() if len(dataset) else []
        report["splits"][name] = {"images": len(dataset), "bad": len(found)}
        problems += found
    report["problems"] = problems
    return report
