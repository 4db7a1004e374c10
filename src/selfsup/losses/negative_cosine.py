"""The regression losses of the methods without negatives, both on L2-normalised vectors.

SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning", eq. 1)::

    D(p, z) = - p / |p|_2  ·  z / |z|_2

averaged over the batch. BYOL (Grill et al. 2020, "Bootstrap Your Own Latent", eq. 2) regresses
the normalised prediction onto the normalised target projection with a squared error::

    L(q, z') = | q / |q|_2 - z' / |z'|_2 |_2^2  =  2 - 2 cos(q, z')

which is the same quantity up to the affine map 2 + 2 D. Neither loss stops a gradient: the
stop-gradient on the target is the method's (SimSiam detaches z, BYOL's target is a momentum copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z): minus the cosine similarity of the rows of ``p`` and ``z`` (N, D),
    averaged over the N rows; in [-1, 1]."""
    return -(F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1).mean()


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p, z)``: the squared distance of the normalised rows of ``p`` and ``z``
    (N, D), averaged over the N rows; in [0, 4]."""
    return 2.0 + 2.0 * negative_cosine(p, z)


class NegativeCosineLoss(nn.Module):
    """Module form of :func:`negative_cosine`."""

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return negative_cosine(p, z)


class NormalizedMSELoss(nn.Module):
    """Module form of :func:`normalized_mse`."""

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return normalized_mse(p, z)
