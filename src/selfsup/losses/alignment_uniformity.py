"""Alignment and uniformity (Wang & Isola 2020, "Understanding Contrastive Representation Learning
through Alignment and Uniformity on the Hypersphere": L_align, L_uniform and the weighted sum the
paper trains with).

On L2-normalised embeddings f, for positive pairs (x, y) and pairs of data points (x_i, x_j)::

    L_align(alpha)  = E_{(x, y) positive} ||f(x) - f(y)||^alpha
    L_uniform(t)    = log E_{i < j} exp(-t ||f(x_i) - f(x_j)||^2)
    L               = L_align(alpha) + w * (L_uniform(t)(x) + L_uniform(t)(y)) / 2

Paper defaults: alpha = 2, t = 2, w = 1. Uniformity is a log-mean-exp (logsumexp minus log of the
pair count), so it never sums raw exponentials. Squared distances come from the Gram matrix rather
than ``pdist``, whose square root has an infinite derivative at coincident points.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2) -> torch.Tensor:
    """Mean ``||x_i - y_i||^alpha`` over the positive pairs (rows) of ``x``, ``y`` (N, D).

    ``alpha`` >= 1 keeps the gradient finite where a pair coincides.
    """
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)
    # vector_norm's backward is 0 at a zero vector, where sqrt's would be inf.
    return torch.linalg.vector_norm(x - y, dim=-1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2) -> torch.Tensor:
    """log of the mean of ``exp(-t ||x_i - x_j||^2)`` over the pairs i < j of ``x`` (N, D).

    Needs N >= 2 (one point has no pair).
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings to form a pair")
    x = F.normalize(x, dim=-1)
    squared_norms = x.pow(2).sum(dim=-1)
    # Not 2 - 2 x·y: a zero vector (the normalisation of 0) is not on the sphere.
    squared_distances = (squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0)
                         - 2 * x @ x.transpose(0, 1)).clamp(min=0)
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    pairs = squared_distances[i, j]
    return torch.logsumexp(-t * pairs, dim=0) - math.log(pairs.numel())


def align_uniform_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 2, t: float = 2,
                       uniformity_weight: float = 1.0) -> torch.Tensor:
    """The paper's objective: alignment + w * (uniformity(x) + uniformity(y)) / 2."""
    return alignment(x, y, alpha) + uniformity_weight * (uniformity(x, t) + uniformity(y, t)) / 2


class AlignmentLoss(nn.Module):
    """Module form of :func:`alignment`."""

    def __init__(self, alpha: float = 2) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return alignment(x, y, self.alpha)


class UniformityLoss(nn.Module):
    """Module form of :func:`uniformity`."""

    def __init__(self, t: float = 2) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uniformity(x, self.t)


class AlignUniformLoss(nn.Module):
    """Module form of :func:`align_uniform_loss`."""

    def __init__(self, alpha: float = 2, t: float = 2, uniformity_weight: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.t = t
        self.uniformity_weight = uniformity_weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return align_uniform_loss(x, y, self.alpha, self.t, self.uniformity_weight)
