"""Triplet and N-pair losses, the metric-learning losses that SupCon generalises (Khosla et al.
2020 show SupCon with one positive and one negative is the triplet loss, and with one positive
per anchor the N-pair loss).

Triplet (Schroff et al. 2015, "FaceNet: A Unified Embedding for Face Recognition and Clustering",
Sec. 3.1), on L2-normalised embeddings as in FaceNet::

    L = 1/N * sum_i max(0,  ||a_i - p_i||^2 - ||a_i - n_i||^2 + margin)

FaceNet uses margin 0.2 and sums over triplets; here the mean, with margin 1.0 by default (squared
distances on the unit sphere lie in [0, 4]).

N-pair (Sohn 2016, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", the
multi-class N-pair-mc form): each anchor a_i has positive p_i and the other positives
p_j (j != i) as negatives::

    L = 1/N * sum_i log(1 + sum_{j != i} exp(a_i·p_j - a_i·p_i))
      = 1/N * sum_i -log  exp(a_i·p_i) / sum_j exp(a_i·p_j)

computed as a cross-entropy over ``a @ p.T`` with target i. Sohn keeps the embeddings unnormalised
and penalises their L2 norm instead; here they are L2-normalised like every other loss of this
package, which keeps a @ p.T finite on any input scale and makes N-pair the in-batch InfoNCE at
temperature 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
            margin: float = 1.0) -> torch.Tensor:
    """Mean hinge ``max(0, ||a - p||^2 - ||a - n||^2 + margin)`` over the rows of (N, D) inputs."""
    anchor = F.normalize(anchor, dim=-1)
    positive = F.normalize(positive, dim=-1)
    negative = F.normalize(negative, dim=-1)
    positive_distance = (anchor - positive).pow(2).sum(dim=-1)
    negative_distance = (anchor - negative).pow(2).sum(dim=-1)
    return F.relu(positive_distance - negative_distance + margin).mean()


def n_pair(anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Multi-class N-pair loss of ``anchor``, ``positive`` (N, D); ``positive[i]`` is row i's."""
    anchor = F.normalize(anchor, dim=-1)
    positive = F.normalize(positive, dim=-1)
    logits = anchor @ positive.transpose(0, 1)
    return F.cross_entropy(logits, torch.arange(anchor.shape[0], device=anchor.device))


class TripletLoss(nn.Module):
    """Module form of :func:`triplet`."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor,
                negative: torch.Tensor) -> torch.Tensor:
        return triplet(anchor, positive, negative, self.margin)


class NPairLoss(nn.Module):
    """Module form of :func:`n_pair`."""

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        return n_pair(anchor, positive)
