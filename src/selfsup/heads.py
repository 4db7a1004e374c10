"""Projection heads.

``ProjectionMLP`` covers the heads of SimCLR (Chen et al. 2020: Linear-BN-ReLU-Linear, 2048 -> 128
in their code) and MoCo v2 (Chen et al. 2020b: Linear-ReLU-Linear, 2048 -> 128, no BN), and with
``output_batch_norm`` those of MoCo v3 (Chen, Xie & He 2021, after SimCLR v2: BN on every layer, the
last one without affine parameters). ``DINOHead`` is DINO's (Caron et al. 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class ProjectionMLP(nn.Sequential):
    """``num_layers`` linear layers with ReLU (and optionally BatchNorm) between them.

    ``output_batch_norm`` also normalises the output, with a BatchNorm without affine parameters
    (MoCo v3's heads; the last linear layer then has no bias, which that BN would cancel).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, output_batch_norm: bool = False) -> None:
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not output_batch_norm))
        if output_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.out_dim = out_dim


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Section 3.1 and Appendix; the reference
    ``DINOHead`` of facebookresearch/dino, ``vision_transformer.py``).

    A ``num_layers``-layer MLP with GELU (``in_dim`` -> ``hidden_dim`` ... -> ``bottleneck_dim``,
    weights from a normal of std 0.02 truncated at +-2, biases 0; with ``use_bn``, a BatchNorm
    after every hidden layer, the reference's ``--use_bn_in_head``, off by default), L2
    normalisation, then a weight-normalised linear layer without bias to ``out_dim``
    (``w = g v / |v|`` per output row, with g set to 1). ``norm_last_layer`` keeps g at 1 (no
    gradient), as the paper recommends for stability.

    The head runs in its parameters' dtype (float32) under autocast: its outputs are bounded by
    |g| = 1 and the teacher's are divided by 0.04, so bfloat16's rounding would be amplified
    25-fold; beside the backbone its cost is negligible.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3,
                 norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs at least 1 layer, got num_layers={num_layers}")
        widths = [in_dim, *[hidden_dim] * (num_layers - 1), bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            if index > 0:
                if use_bn:
                    layers.append(nn.BatchNorm1d(width_in))
                layers.append(nn.GELU())
            linear = nn.Linear(width_in, width_out)
            nn.init.trunc_normal_(linear.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
        self.mlp = nn.Sequential(*layers)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In the parameters' dtype (float32 under mixed precision), not autocast's.
        dtype = self.last_layer.parametrizations.weight.original1.dtype
        with torch.autocast(x.device.type, enabled=False):
            bottleneck = F.normalize(self.mlp(x.to(dtype)), dim=-1)
            return self.last_layer(bottleneck)
