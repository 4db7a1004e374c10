"""Machine ceilings and SimCLR training-step throughput.

Prints the float32 and bf16 matmul ceilings of this machine (2048^3 matmuls), then the SimCLR step
(on-device augmentation + ResNet forward/backward + NT-Xent + optimizer) in img/s and model FLOP/s
as a fraction of the ceiling of its precision. FLOPs are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of the network and loss). Every
variant is measured in this run, so the ratios between them hold on a noisy machine.

    python benchmarks/train_step.py [--device cpu|cuda] [--batch-size 256] [--width 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"device: {name}; torch {torch.__version__}")
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
