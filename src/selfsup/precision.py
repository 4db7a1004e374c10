"""Which numeric precision a run uses: float32, bf16 autocast, or ``auto`` (bf16 where the device
computes it natively).

On a CPU without AVX512_BF16 or AMX (e.g. Intel Ice Lake), torch emulates bf16 arithmetic and a
bf16 autocast step is slower than float32: 2 epochs of Barlow Twins' learning test took 23.6 s in
bf16 and 16.9 s in float32 on an Ice Lake Xeon, while on a Zen 4 with AVX512_BF16 a bf16 matmul
runs at about 420 GFLOP/s against 180-190 in float32 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["32", "bf16", "auto"]
ResolvedPrecision = Literal["32", "bf16"]


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda", ...) computes bf16 in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        # Private probes of torch.cpu, absent from older torch releases.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def accelerator_device_type(accelerator: str) -> str:
    """The device type Lightning's ``accelerator`` ("auto", "cpu", "gpu") trains on."""
    if accelerator == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if accelerator == "gpu" and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: Precision, device_type: str) -> ResolvedPrecision:
    """``precision`` with ``auto`` decided for ``device_type``: bf16 if native there, else 32."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "32"
    return precision
