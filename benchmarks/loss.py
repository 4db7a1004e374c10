"""NT-Xent forward + backward at a large batch: time and peak memory of lightly's ``NTXentLoss``,
our dense and blockwise ``nt_xent``, and pytorch-metric-learning's ``NTXentLoss``, side by side.

Each measurement runs in its own subprocess: the worker imports its library, allocates the inputs
(2N embeddings of D float32 dims, seeded, the same for everyone) and warms torch up on a tiny
matmul; its max RSS then is the floor. It runs the loss forward and backward (one warm-up, then
``--repeats`` timed runs) and reports the median time and max RSS above that floor (on a GPU:
``torch.cuda.max_memory_allocated`` above the inputs). The machine is shared and noisy, so the
variants take turns for ``--rounds`` rounds and the medians over rounds are compared: read the
ratios to lightly, not the seconds. Every worker runs with the same ``OMP_WAIT_POLICY`` (PASSIVE
unless told otherwise: OpenMP threads that spin between parallel regions fight the other tenants
of a shared machine, which costs most the code with the most regions, the tiled loss).

PML builds a (positive pairs) x (negative pairs) matrix, which at 2N = 8192 is hundreds of GB: its
worker runs once, under an address-space limit, and the failure is reported. Then our blockwise
loss at ``--large-n`` (default 2N = 65,536), which must stay within 4 GiB, and the matmul-only
lower bound: the forward matmul, its recomputation in backward and the two backward matmuls
(4 x 2 (2N)^2 D FLOP) at the float32 ceiling measured in the same run (a 2048^3 matmul), beside
the same matmuls timed alone.

    python benchmarks/loss.py [--n 8192] [--dim 128] [--device cpu|cuda] [--rounds 3]
                              [--repeats 3] [--large-n 65536] [--threads T] [--block B]
                              [--omp-wait-policy PASSIVE|ACTIVE|inherit]

Needs the ``bench`` extra (lightly, pytorch-metric-learning); a missing library is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

TEMPERATURE = 0.5
VARIANTS = {
    "lightly": "lightly NTXentLoss",
    "dense": "selfsup nt_xent, dense (block_size=0)",
    "blockwise": "selfsup nt_xent, blockwise",
    "pml": "pytorch-metric-learning NTXentLoss",
}
GIB = 2**30
MIB = 2**20
PML_ADDRESS_SPACE = 8 * GIB  # beyond what PML holds at import: it fails cleanly past this


# ---- the worker: one variant in a fresh process ------------------------------------------------

def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _build_loss(variant: str, z1, z2, block: int | None):
    """A closure computing the loss of ``variant`` on (z1, z2): imports happen here."""
    import torch

    if variant == "lightly":
        from lightly.loss import NTXentLoss

        module = NTXentLoss(temperature=TEMPERATURE)
        return lambda: module(z1, z2), None
    if variant in ("dense", "blockwise"):
        from selfsup.losses import nt_xent
        from selfsup.losses.blockwise import resolve_block_size

        block_size = 0 if variant == "dense" else block
        tile = resolve_block_size(2 * z1.shape[0], 2 * z1.shape[0], block_size, z1.device)
        return lambda: nt_xent(z1, z2, TEMPERATURE, block_size=block_size), tile
    if variant == "pml":
        from pytorch_metric_learning.losses import NTXentLoss

        module = NTXentLoss(temperature=TEMPERATURE)
        labels = torch.arange(z1.shape[0], device=z1.device).repeat(2)
        return lambda: module(torch.cat([z1, z2]), labels), None
    raise ValueError(variant)


def _limit_address_space(extra_bytes: int) -> None:
    """Cap this process's virtual memory at its current size plus ``extra_bytes``, so a giant
    allocation fails with an error instead of waking the OOM killer on a shared machine."""
    with open("/proc/self/statm") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, current + extra_bytes))


def worker(variant: str, n: int, dim: int, device: str, repeats: int, threads: int | None,
           block: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(n // 2, dim, generator=generator).to(device).requires_grad_(True)
    z2 = torch.randn(n // 2, dim, generator=generator).to(device).requires_grad_(True)
    try:
        compute, tile = _build_loss(variant, z1, z2, block)
    except ImportError as error:
        return {"error": f"not installed ({error.name}): pip install -e '.[bench]'"}
    warm = torch.randn(64, 64, device=device)
    (warm @ warm).exp().sum().item()  # thread pools and BLAS initialised before the floor
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        floor = torch.cuda.memory_allocated()
    else:
        floor = _max_rss_bytes()
    if variant == "pml" and not cuda:  # (a GPU fails cleanly by itself)
        _limit_address_space(PML_ADDRESS_SPACE)

    def step() -> tuple[float, float]:
        z1.grad = z2.grad = None
        start = time.perf_counter()
        loss = compute()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, loss.item()

    try:
        times = [step() for _ in range(1 + repeats)][1:] if repeats else [step()]
    except (RuntimeError, MemoryError) as error:
        message = str(error).splitlines()[0]
        if "you tried to allocate" in message:  # torch's CPU allocator: keep the size only
            message = message[message.index("you tried"):].split(". ")[0]
        cap = (f" (address space capped at +{PML_ADDRESS_SPACE // GIB} GiB)"
               if variant == "pml" and not cuda else "")
        return {"error": f"{type(error).__name__}: {message[:160]}{cap}"}
    peak = torch.cuda.max_memory_allocated() if cuda else _max_rss_bytes()
    return {"seconds": statistics.median(t for t, _ in times), "loss": times[-1][1],
            "peak_above_floor": peak - floor, "peak_total": peak,
            "block": tile}


def matmul_bound(n: int, dim: int, device: str, threads: int | None, block: int | None) -> dict:
    """The float32 ceiling (a 2048^3 matmul), and the loss's matmuls alone, timed: the dense
    loss's three (logits, then the two of backward) and the blockwise loss's four (the same plus
    the recomputation in backward) in its tiles, with none of the element-wise work."""
    import torch

    from selfsup.losses.blockwise import resolve_block_size

    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def seconds(fn, repeats: int, best: bool = False) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times) if best else statistics.median(times)

    square = torch.randn(2048, 2048, device=device)
    # A ceiling is the best the machine does: the fastest of several, not their median.
    ceiling = 2 * 2048**3 / seconds(lambda: square @ square, 10, best=True)
    z = torch.randn(n, dim, device=device)
    gradient = torch.empty_like(z)

    def dense() -> None:
        probabilities = z @ z.T
        torch.mm(probabilities, z, out=gradient)
        torch.mm(probabilities.T, z, out=gradient)

    tile = resolve_block_size(n, n, block, torch.device(device))

    def tiled() -> None:
        for row0 in range(0, n, tile):
            for col0 in range(0, n, tile):
                z[row0:row0 + tile] @ z[col0:col0 + tile].T
        for row0 in range(0, n, tile):
            for col0 in range(0, n, tile):
                probabilities = z[row0:row0 + tile] @ z[col0:col0 + tile].T
                gradient[row0:row0 + tile].addmm_(probabilities, z[col0:col0 + tile])
                gradient[col0:col0 + tile].addmm_(probabilities.T, z[row0:row0 + tile])

    return {"ceiling": ceiling, "flop_per_matmul": 2 * n * n * dim,
            "dense_matmuls": seconds(dense, 3), "tiled_matmuls": seconds(tiled, 3),
            "tile": tile}


# ---- the driver --------------------------------------------------------------------------------

def run_worker(variant: str, n: int, args: argparse.Namespace, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--n", str(n), "--dim",
               str(args.dim), "--device", args.device, "--repeats", str(repeats)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.block is not None:
        command += ["--block", str(args.block)]
    environment = dict(os.environ)
    if args.omp_wait_policy != "inherit":
        environment["OMP_WAIT_POLICY"] = args.omp_wait_policy
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:160]
        return {"error": f"worker exited with {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _fmt_mb(value: float) -> str:
    return f"{value / MIB:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="2N, the number of embeddings")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-n", type=int, default=65536, help="2N of the large run, 0: skip")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--block", type=int, default=None,
                        help="the blockwise variant's block_size (default: automatic)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        choices=["PASSIVE", "ACTIVE", "inherit"],
                        help="OMP_WAIT_POLICY of every worker (default PASSIVE: on a shared "
                             "machine, spinning OpenMP threads fight the other tenants)")
    parser.add_argument("--worker", choices=sorted(VARIANTS) + ["bound"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "bound":
        print(json.dumps(matmul_bound(args.n, args.dim, args.device, args.threads, args.block)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.dim, args.device, args.repeats,
                                args.threads, args.block)))
        return

    import torch

    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else _cpu_name())
    wait_policy = (os.environ.get("OMP_WAIT_POLICY", "unset") if args.omp_wait_policy == "inherit"
                   else args.omp_wait_policy)
    print(f"NT-Xent forward+backward, 2N={args.n}, D={args.dim}, float32, t={TEMPERATURE}, "
          f"device {args.device} ({machine}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start), torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads, OMP_WAIT_POLICY={wait_policy}"
          f"; median of {args.repeats} runs per round, {args.rounds} rounds, each variant in "
          f"its own process")
    memory_note = ("torch.cuda.max_memory_allocated above the inputs" if args.device != "cpu"
                   else "max RSS above the import + inputs floor")
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    # PML once, with no repeat: it is expected to fail.
    results["pml"].append(run_worker("pml", args.n, args, repeats=0))
    for _ in range(args.rounds):
        for name in ("lightly", "dense", "blockwise"):
            results[name].append(run_worker(name, args.n, args, args.repeats))
    bound = run_worker("bound", args.n, args, 0)

    summary = {}
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            summary[name] = {"error": runs[0]["error"]}
            continue
        summary[name] = {"seconds": statistics.median(r["seconds"] for r in ok),
                         "memory": statistics.median(r["peak_above_floor"] for r in ok),
                         "loss": ok[0]["loss"], "block": ok[0]["block"],
                         "rounds": [round(r["seconds"], 3) for r in ok]}
    base = summary["lightly"]
    print(f"\nmemory: {memory_note}\n")
    print(f"{'variant':<50} {'time':>9} {'memory':>10} {'time/lightly':>13} {'mem/lightly':>12}"
          f"  {'loss':>9}  time per round")
    for name, label in VARIANTS.items():
        row = summary[name]
        if name == "blockwise" and "block" in row:
            label = (f"selfsup nt_xent, blockwise (automatic: block {row['block']})"
                     if args.block is None else f"selfsup nt_xent, block_size={args.block}")
        if "error" in row:
            print(f"{label:<50} failed: {row['error']}")
            continue
        time_ratio = (f"{row['seconds'] / base['seconds']:.3f}x" if "error" not in base else "-")
        memory_ratio = (f"{row['memory'] / base['memory']:.3f}x" if "error" not in base else "-")
        print(f"{label:<50} {row['seconds']:>8.3f}s {_fmt_mb(row['memory']):>10} "
              f"{time_ratio:>13} {memory_ratio:>12}  {row['loss']:>9.6f}  {row['rounds']}")

    if "error" not in bound:
        ceiling, flop = bound["ceiling"], bound["flop_per_matmul"]
        print(f"\nfloat32 matmul ceiling (2048^3, best of 10, this run): {ceiling / 1e9:.0f} "
              f"GFLOP/s")
        print(f"matmul-only lower bound at that ceiling, {flop / 1e9:.1f} GFLOP per 2N x 2N x D "
              f"matmul: {3 * flop / ceiling:.3f}s for the dense loss's 3 (forward, 2 in backward), "
              f"{4 * flop / ceiling:.3f}s for the blockwise loss's 4 (+ the recomputation)")
        print(f"the same matmuls alone, timed at the loss's shapes: dense 3 in "
              f"{bound['dense_matmuls']:.3f}s, blockwise 4 in tiles of {bound['tile']} in "
              f"{bound['tiled_matmuls']:.3f}s")
        if "error" not in summary["blockwise"]:
            seconds = summary["blockwise"]["seconds"]
            print(f"blockwise loss: {seconds / (4 * flop / ceiling):.2f}x the 4-matmul bound, "
                  f"{seconds / bound['tiled_matmuls']:.2f}x its own matmuls alone")

    if "error" not in base and "error" not in summary["blockwise"]:
        ours = summary["blockwise"]
        time_ratio = ours["seconds"] / base["seconds"]
        memory_ratio = ours["memory"] / base["memory"]
        print(f"\ntargets vs lightly (blockwise): time {time_ratio:.3f}x <= 0.5x: "
              f"{'met' if time_ratio <= 0.5 else 'MISSED'}; memory {memory_ratio:.3f}x <= 0.1x: "
              f"{'met' if memory_ratio <= 0.1 else 'MISSED'}")

    print(f"load average at the end of the comparison: {os.getloadavg()[0]:.1f}")
    if args.large_n:
        large = run_worker("blockwise", args.large_n, args, repeats=0)
        if "error" in large:
            print(f"\nblockwise at 2N={args.large_n}: failed: {large['error']}")
        else:
            dense_logits = args.large_n**2 * 4
            print(f"\nblockwise at 2N={args.large_n} (block {large['block']}): "
                  f"{large['seconds']:.1f}s forward+backward, peak {_fmt_mb(large['peak_total'])} "
                  f"({_fmt_mb(large['peak_above_floor'])} above the floor; dense logits alone "
                  f"would be {dense_logits / GIB:.1f} GiB); within 4 GiB: "
                  f"{'yes' if large['peak_total'] <= 4 * GIB else 'NO'}")


if __name__ == "__main__":
    main()
