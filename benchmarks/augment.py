"""Throughput of the batched augmentation recipes against torchvision on PIL and kornia, one thread.

For each case, in this one process and on the same images: ours on the uint8 batch as a tensor
(on --device), torchvision's ``transforms.v2`` pipeline with the same settings on each PIL image
(view after view, then stacked as a DataLoader would collate them), and kornia's
``AugmentationSequential`` equivalent on the float batch, called once per view (its colour
jitter draws one order per call where ours and torchvision's draw one per image). The cases:
the SimCLR two-view recipe at 32, 96 and 224 px, and the SwAV multi-crop recipe (2 global crops
of the image size and 6 local crops; 96 px locals at 224 px). Inputs larger than CIFAR's 32 px
are CIFAR-10 test images resized with PIL.

The three sides run in turn inside each timed round, after warm-up rounds, so that a load that
comes and goes on a shared machine hits them alike; the script prints the median images per
second (an image is one sample turned into all of its views) by wall clock and by the process's
CPU time, and the ratios of ours to each baseline on each clock. The CPU-time figures are the
ones to read on a machine shared with other work. torch and PIL use one thread.

    python benchmarks/augment.py [--device cpu|cuda] [--sizes 32 96 224] [--repeats 7] [--only NAME] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from selfsup.augment import build_view_generator
from selfsup.augment.recipes import _blur_kernel_size, _local_crop_size

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10.npz"
SWAV_LOCAL_CROPS = 6


def load_images(batch: int, size: int) -> np.ndarray:
    """``batch`` CIFAR-10 test images (N, size, size, 3) uint8 (random ones without the data)."""
    if CIFAR_NPZ.exists():
        with np.load(CIFAR_NPZ) as data:
            images = data["x_test"][:batch]
    else:
        print(f"{CIFAR_NPZ} not found: using random images")
        images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    if size == images.shape[1]:
        return images
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) for x in images])


def torchvision_view(crop: int, scale: tuple[float, float], jitter: tuple[float, ...], blur: bool) -> v2.Compose:
    """One view as the reference implementations write it (SimCLR, SwAV): crop, flip, jitter,
    grayscale, blur (kernel 10% of the crop, p = 0.5) when ``blur``, normalise."""
    ops: list[nn.Module] = [
        v2.RandomResizedCrop(crop, scale=scale),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur:
        ops.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel_size(crop), sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose([*ops, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)])


def kornia_view(crop: int, scale: tuple[float, float], jitter: tuple[float, ...], blur: bool) -> nn.Module:
    """The same view with kornia, on a float batch in [0, 1]."""
    ops: list[nn.Module] = [
        K.RandomResizedCrop((crop, crop), scale=scale),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(*jitter, p=0.8),
        K.RandomGrayscale(p=0.2),
    ]
    if blur:
        kernel = _blur_kernel_size(crop)
        ops.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=0.5))
    return K.AugmentationSequential(*ops, K.Normalize(torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)))


@dataclass
class Case:
    name: str
    recipe: str
    size: int
    batch: int
    num_views: int
    # (crop size, scale, number of views) per group of views, for the baselines.
    groups: list[tuple[int, tuple[float, float], int]]
    jitter: tuple[float, ...]


def cases(sizes: list[int], batch: int, batch_224: int) -> list[Case]:
    simclr = [
        Case(f"simclr 2 views, {s} px", "simclr", s, batch_224 if s >= 224 else batch, 2,
             [(s, (0.08, 1.0), 2)], (0.4, 0.4, 0.4, 0.1))
        for s in sizes
    ]
    swav = []
    for s in (32, 224):
        local = _local_crop_size(s)
        swav.append(Case(f"swav 2x{s} + {SWAV_LOCAL_CROPS}x{local} px", "swav", s, batch_224 if s >= 224 else batch,
                         2 + SWAV_LOCAL_CROPS, [(s, (0.14, 1.0), 2), (local, (0.05, 0.14), SWAV_LOCAL_CROPS)],
                         (0.8, 0.8, 0.8, 0.2)))
    return simclr + swav


def run_case(case: Case, device: torch.device, warmup: int, repeats: int, profile: bool) -> None:
    pixels = load_images(case.batch, case.size)
    pil_images = [Image.fromarray(image) for image in pixels]
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)
    blur = case.size >= 96

    ours_views = build_view_generator(case.recipe, case.size, CIFAR_MEAN, CIFAR_STD, num_views=case.num_views)
    generator = torch.Generator(device=device).manual_seed(0)
    tv_groups = [(torchvision_view(crop, scale, case.jitter, blur), n) for crop, scale, n in case.groups]
    kornia_groups = [(kornia_view(crop, scale, case.jitter, blur).to(device), n) for crop, scale, n in case.groups]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours() -> list[torch.Tensor]:
        return ours_views(batch, generator)

    def torchvision_pil() -> list[torch.Tensor]:
        return [torch.stack([t(image) for image in pil_images]) for t, n in tv_groups for _ in range(n)]

    def kornia() -> list[torch.Tensor]:
        images = batch.to(torch.float32).mul_(1.0 / 255.0)
        return [aug(images) for aug, n in kornia_groups for _ in range(n)]

    sides: dict[str, Callable[[], object]] = {"selfsup": ours, "torchvision": torchvision_pil, "kornia": kornia}
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(warmup + repeats):
        for name, step in sides.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            sync()
            if round_ >= warmup:
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)

    rate = {clock: {name: case.batch / statistics.median(times[name]) for name in sides}
            for clock, times in (("wall", wall), ("cpu", cpu))}
    print(f"{case.name}, batch {case.batch}, {case.num_views} views per image")
    for name in sides:
        where = f"{device.type}, batched" if name == "selfsup" else (
            "cpu, per PIL image" if name == "torchvision" else f"{device.type}, batched")
        print(f"  {name:12s} ({where:18s}) {rate['wall'][name]:10,.0f} img/s wall  {rate['cpu'][name]:10,.0f} img/s cpu")
    for baseline in ("torchvision", "kornia"):
        print(f"  ratio selfsup / {baseline:12s} {rate['wall']['selfsup'] / rate['wall'][baseline]:6.2f}x wall"
              f"  {rate['cpu']['selfsup'] / rate['cpu'][baseline]:6.2f}x cpu")
    if profile:
        with torch.profiler.profile() as prof:
            for _ in range(repeats):
                ours()
                sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the batched sides run (cpu, cuda)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224], help="SimCLR image sizes")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batch-224", type=int, default=64, help="batch from 224 px on")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--profile", action="store_true", help="also print where our side spends its time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch thread, device {device}; "
          f"median of {args.repeats} rounds after {args.warmup} warm-up rounds")
    for case in cases(args.sizes, args.batch, args.batch_224):
        if args.only is None or args.only in case.name:
            run_case(case, device, args.warmup, args.repeats, args.profile)


if __name__ == "__main__":
    main()
