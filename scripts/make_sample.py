"""Cut the embedded CIFAR-10 sample that ``selfsup`` ships as its default dataset.

The sample is class-balanced (500 train and 100 test images per class) and chosen with a fixed
seed, so rebuilding it from the same ``cifar10.npz`` gives the same bytes-for-bytes arrays. It is
what a fresh clone without ``../shared`` trains, demos and tests on.

Usage::

    python scripts/make_sample.py [--source ../shared/data/cifar10/cifar10.npz] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"
DEFAULT_OUT = REPO / "src" / "selfsup" / "data" / "assets" / "cifar10_sample.npz"
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
SEED = 0
MAX_BYTES = 20 * 1024 * 1024


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``per_class`` indices of every class without replacement, kept in source order."""
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise SystemExit(f"class {cls} has only {len(members)} images, {per_class} wanted")
        chosen.append(np.sort(rng.choice(members, size=per_class, replace=False)))
    return np.concatenate(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    if not args.source.is_file():
        print(f"error: {args.source} not found", file=sys.stderr)
        return 1
    with np.load(args.source, allow_pickle=False) as full:
        x_train, y_train = full["x_train"], full["y_train"]
        x_test, y_test = full["x_test"], full["y_test"]
        classes = np.asarray(full["classes"], dtype=np.str_)  # unicode array: no pickle needed

    # One generator for both splits, drawn in a fixed order, so the sample depends on SEED only.
    rng = np.random.default_rng(SEED)
    train_idx = balanced_indices(y_train, TRAIN_PER_CLASS, rng)
    test_idx = balanced_indices(y_test, TEST_PER_CLASS, rng)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        x_train=np.ascontiguousarray(x_train[train_idx], dtype=np.uint8),
        y_train=y_train[train_idx].astype(np.uint8),
        x_test=np.ascontiguousarray(x_test[test_idx], dtype=np.uint8),
        y_test=y_test[test_idx].astype(np.uint8),
        classes=classes,
    )
    data = args.out.read_bytes()
    print(f"wrote {args.out}")
    print(f"train {len(train_idx)}  test {len(test_idx)}  classes {len(classes)}")
    print(f"size {len(data):,} bytes")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")
    if len(data) >= MAX_BYTES:
        print(f"error: sample is {len(data):,} bytes, limit {MAX_BYTES:,}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
