"""Machine ceilings and SimCLR training-step throughput.

Prints the float32 and bf16 matmul ceilings of this machine (2048^3 matmuls), then the SimCLR step
(on-device augmentation + ResNet forward/backward + NT-Xent + optimizer) in img/s and model FLOP/s
as a fraction of the ceiling of its precision. FLOPs are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of the network and loss). Every
variant is measured in this run, so the ratios between them hold on a noisy machine.

    python benchmarks/train_step.py [--device cpu|cuda] [--batch-size 256] [--width 1.0]
    python benchmarks/train_step.py --vs-lightly [--device cpu|cuda] [--workers 2]

``--vs-lightly`` runs the whole loop, data loading included, of lightly's CIFAR-10 benchmark
(``docs/source/getting_started/benchmarks/cifar10_benchmark.py``, as ``lightly_recipes.py`` here
has it: ``SimCLRTransform`` without blur on PIL images in DataLoader workers, lightly's CIFAR
ResNet-18, ``SimCLRProjectionHead(512, 512, 128)``, ``NTXentLoss``, SGD, fp32) beside selfsup's
(uint8 batches from the loader, augmentation on the device, bf16 autocast, channels_last, LARS)
on the embedded CIFAR-10 sample, and prints the ratio. lightly's images are handed to it already
decoded (PIL, in memory), which only spares it work. Needs the ``bench`` extra (lightly).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightly_recipes import LightlySimCLR, lightly_loader  # benchmarks/lightly_recipes.py
from torch.utils.flop_counter import FlopCounterMode

from selfsup.augment import build_view_generator
from selfsup.backbones import build_backbone
from selfsup.data import CIFAR10_MEAN, CIFAR10_STD
from selfsup.methods import Batch, MethodContext, build_method
from selfsup.optim import LARS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int = 2048,
                   repeats: int = 10) -> float:
    """Best-of-``repeats`` FLOP/s of one ``size``^3 matmul."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def simclr_step_throughput(device: torch.device, batch_size: int, width: float, bf16: bool,
                           channels_last: bool, steps: int) -> tuple[float, float]:
    """(images per second, FLOPs per step) of SimCLR training on uint8 CIFAR-sized batches."""
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("resnet18", cifar_stem=True, width=width)
    method = build_method("simclr", backbone, MethodContext(feature_dim, 50_000, 10, 32)).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    method = method.to(memory_format=memory_format)
    optimizer = LARS(method.parameters(), lr=0.3)
    views = build_view_generator("simclr", 32, CIFAR10_MEAN, CIFAR10_STD)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        x1, x2 = (v.contiguous(memory_format=memory_format) for v in views(images, generator))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = method.training_step(Batch([x1, x2], None, torch.arange(batch_size),
                                              generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times), flops


WARMUP_STEPS = 5


def _timed_loop(loader, step, steps: int, device: torch.device) -> float:
    """Images per second over ``steps`` steps (after ``WARMUP_STEPS`` untimed ones: cuDNN's
    algorithm search and the workers' start), data loading included; the loader is run for as
    many epochs as that takes."""
    def forever():
        while True:
            yield from loader

    batches = forever()
    for _ in range(WARMUP_STEPS):
        step(next(batches))
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += step(next(batches))
    _sync(device)
    return images / (time.perf_counter() - start)


def lightly_loop_throughput(device: torch.device, batch_size: int, steps: int,
                            workers: int) -> float:
    """img/s of lightly's CIFAR-10 benchmark loop for SimCLR (see the module docstring)."""
    from lightly.models import ResNetGenerator
    from torch import nn

    from selfsup.data.sample import read_sample

    torch.manual_seed(0)
    loader = lightly_loader(read_sample().x_train, batch_size, workers)
    resnet = ResNetGenerator("resnet-18")
    backbone = nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1))
    model = LightlySimCLR(backbone, 512, batch_size, epochs=1, device=device)
    return _timed_loop(loader, model.step, steps, device)


def selfsup_loop_throughput(device: torch.device, batch_size: int, steps: int,
                            workers: int) -> float:
    """img/s of selfsup's SimCLR loop on the same images: bf16 autocast, channels_last, LARS."""
    from selfsup.data import build_loader, load_data

    torch.manual_seed(0)
    splits = load_data("cifar10-sample", val_fraction=0.1, seed=0)
    loader = build_loader(splits.train, batch_size, shuffle=True, drop_last=True,
                          num_workers=workers, seed=0)
    backbone, feature_dim = build_backbone("resnet18", cifar_stem=True)
    method = build_method("simclr", backbone, MethodContext(feature_dim, 50_000, 10, 32))
    method = method.to(device).to(memory_format=torch.channels_last)
    optimizer = LARS(method.parameters(), lr=0.3)
    views = build_view_generator("simclr", 32, CIFAR10_MEAN, CIFAR10_STD)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(batch) -> int:
        images = batch.images.to(device, non_blocking=True)
        x1, x2 = (v.contiguous(memory_format=torch.channels_last)
                  for v in views(images, generator))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = method.training_step(Batch([x1, x2], None, batch.index, generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return images.shape[0]

    return _timed_loop(loader, step, steps, device)


def compare_with_lightly(device: torch.device, batch_size: int, steps: int, workers: int) -> None:
    print(f"\nSimCLR loop end to end (data loading included), ResNet-18 CIFAR stem, batch "
          f"{batch_size}, {workers} loader workers, {steps} timed steps:")
    lightly_rate = lightly_loop_throughput(device, batch_size, steps, workers)
    ours = selfsup_loop_throughput(device, batch_size, steps, workers)
    print(f"{'lightly benchmark loop (PIL in workers, fp32)':52s} {lightly_rate:8.1f} img/s")
    print(f"{'selfsup (augment on device, bf16, channels_last)':52s} {ours:8.1f} img/s "
          f"{ours / lightly_rate:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vs-lightly", action="store_true",
                        help="only the end-to-end comparison with lightly's benchmark loop")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (--vs-lightly)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"device: {name}; torch {torch.__version__}")
    if args.vs_lightly:
        compare_with_lightly(device, args.batch_size, args.steps, args.workers)
        return
    # cuDNN runs float32 convolutions in TF32 by default, so on CUDA the fair float32 ceiling is
    # the TF32 matmul; on the CPU there is no such mode.
    torch.backends.cuda.matmul.allow_tf32 = True
    ceiling = {False: matmul_ceiling(device, torch.float32), True: matmul_ceiling(device, torch.bfloat16)}
    tf32 = " (TF32)" if device.type == "cuda" else ""
    print(f"matmul 2048^3 float32{tf32}: {ceiling[False] / 1e9:8.1f} GFLOP/s")
    print(f"matmul 2048^3 bf16:    {ceiling[True] / 1e9:8.1f} GFLOP/s "
          f"({ceiling[True] / ceiling[False]:.2f}x float32)")
    print(f"\nSimCLR step, ResNet-18 (CIFAR stem, width {args.width}), batch {args.batch_size}, "
          "two views, augmentation on the device:")
    print(f"{'variant':28s} {'img/s':>8s} {'GFLOP/s':>8s} {'of ceiling':>10s} {'vs fp32':>8s}")
    baseline = None
    for label, bf16, channels_last in [("fp32", False, False), ("fp32 channels_last", False, True),
                                       ("bf16 autocast", True, False),
                                       ("bf16 autocast channels_last", True, True)]:
        rate, flops = simclr_step_throughput(device, args.batch_size, args.width, bf16,
                                             channels_last, args.steps)
        flops_per_second = rate / args.batch_size * flops
        baseline = baseline or rate
        print(f"{label:28s} {rate:8.1f} {flops_per_second / 1e9:8.1f} "
              f"{flops_per_second / ceiling[bf16]:10.1%} {rate / baseline:7.2f}x")


if __name__ == "__main__":
    main()
