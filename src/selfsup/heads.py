"""Projection heads.

``ProjectionMLP`` covers the heads of SimCLR (Chen et al. 2020: Linear-BN-ReLU-Linear, 2048 -> 128
in their code) and MoCo v2 (Chen et al. 2020b: Linear-ReLU-Linear, 2048 -> 128, no BN), and with
``output_batch_norm`` those of MoCo v3 (Chen, Xie & He 2021, after SimCLR v2: BN on every layer, the
last one without affine parameters).
"""

from __future__ import annotations

from torch import nn


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
