"""Throughput of the batched `simclr` two-view recipe against torchvision's per-image pipeline.

Both run in this one process on the same 256 CIFAR-10 images (32 px): ours on the uint8 batch as
a tensor (on --device), torchvision's ``transforms.v2`` SimCLR pipeline (same settings) on each
PIL image, twice, then stacked as a DataLoader would collate it. Each side gets a few warm-up
iterations, then the median of several timed ones; the script prints images per second (an image
is one sample turned into its two views) and the ratio. The machine is shared and noisy: read the
ratio, not the absolute numbers.

    python benchmarks/augment.py [--device cpu|cuda] [--threads 1] [--batch 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from selfsup.augment import build_view_generator

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10.npz"


def load_images(batch: int) -> np.ndarray:
    """``batch`` CIFAR-10 test images (N, 32, 32, 3) uint8, or random ones without the data."""
    if CIFAR_NPZ.exists():
        with np.load(CIFAR_NPZ) as data:
            return data["x_test"][:batch]
    print(f"{CIFAR_NPZ} not found: using random images")
    return np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)


def torchvision_simclr(size: int) -> v2.Compose:
    """SimCLR's CIFAR pipeline (no blur at 32 px), as the reference implementations write it."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0)),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )


def median_seconds(step: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the batched recipe runs (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the PIL side uses one)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    pixels = load_images(args.batch)
    pil_images = [Image.fromarray(image) for image in pixels]
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)

    views = build_view_generator("simclr", args.size, CIFAR_MEAN, CIFAR_STD, num_views=2)
    generator = torch.Generator(device=device).manual_seed(0)
    reference = torchvision_simclr(args.size)

    def ours() -> list[torch.Tensor]:
        return views(batch, generator)

    def theirs() -> list[torch.Tensor]:
        return [torch.stack([reference(image) for image in pil_images]) for _ in range(2)]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ours_s = median_seconds(ours, args.warmup, args.repeats, sync)
    theirs_s = median_seconds(theirs, args.warmup, args.repeats, lambda: None)

    print(f"simclr, 2 views, {args.batch} images of {args.size} px, torch threads {args.threads}")
    print(f"  selfsup.augment ({device.type}, batched):      {args.batch / ours_s:12,.0f} img/s")
    print(f"  torchvision v2 (cpu, per PIL image):  {args.batch / theirs_s:12,.0f} img/s")
    print(f"  ratio selfsup / torchvision: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
