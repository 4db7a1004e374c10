"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML, eq. 1-2).

Each embedding dimension is standardised along the batch (the reference code's
``BatchNorm1d(affine=False)``: mean 0, biased variance 1); the cross-correlation of the two views
is then

    C_ij = sum_b zA_bi zB_bj / N

and the loss pulls its diagonal to 1 (invariance) and its off-diagonal to 0 (redundancy
reduction)::

    L = sum_i (1 - C_ii)^2  +  lambda * sum_i sum_{j != i} C_ij^2

Paper default lambda = 5e-3 (0.0051 in the reference code). The loss is a sum over dimensions, not
a mean: its scale grows with the embedding width, as in the paper.

Under DDP the batch statistics and C must be those of the *global* batch, divided by the global N
(the reference all-reduces C, which it divided by the global batch size; a per-process C divided by
the local N, or summed over processes, changes the loss scale with the number of processes). With
``gather_distributed`` the embeddings of every process are gathered with their gradient, and every
process computes the full loss; the gather's backward (a sum over processes) and DDP's average
over processes then give exactly the gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.distributed import gather_with_grad


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    # BatchNorm1d(affine=False) in training mode: biased variance, eps inside the square root.
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    # The off-diagonal entries of a square matrix as a view, without a D x D mask (D may be 8192):
    # dropping the last element of the flattened matrix and reading it in rows of D + 1 puts every
    # diagonal entry in column 0.
    d = matrix.shape[0]
    return matrix.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3,
                 gather_distributed: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins loss of two views ``z1``, ``z2`` of shape (N, D); ``z1[i]`` pairs ``z2[i]``.

    ``eps`` is added to the variance before the square root (BatchNorm's 1e-5), so a constant
    dimension gives a finite loss; ``eps=0`` is the paper's exact correlation. Computed in at least
    float32 even under autocast: ``1 - C_ii`` must be resolved near 0, which bfloat16's 8 bits of
    mantissa cannot.
    """
    if gather_distributed:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError("barlow_twins standardises along the batch: it needs at least 2 samples")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        c = _standardise(z1.to(dtype), eps).T @ _standardise(z2.to(dtype), eps) / n
        on_diagonal = (1.0 - torch.diagonal(c)).pow(2).sum()
        off_diagonal = _off_diagonal(c).pow(2).sum()
        return on_diagonal + lambd * off_diagonal


class BarlowTwinsLoss(nn.Module):
    """Module form of :func:`barlow_twins`."""

    def __init__(self, lambd: float = 5e-3, gather_distributed: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.lambd = lambd
        self.gather_distributed = gather_distributed
        self.eps = eps

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return barlow_twins(z1, z2, self.lambd, self.gather_distributed, self.eps)
