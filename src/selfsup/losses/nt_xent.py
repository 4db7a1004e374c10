"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020,
"A Simple Framework for Contrastive Learning of Visual Representations", eq. 1).

For 2N augmented views, with sim(u, v) = u·v / (|u||v|) and the positive pair (i, j)::

    l(i, j) = -log  exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)
    L = 1/(2N) * sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]

Each anchor has one positive and 2N - 2 negatives. Paper default t = 0.5 (CIFAR-10 runs use 0.5;
ImageNet 0.1). Computed as log-sum-exp over each anchor's 2N - 1 other views minus its positive
logit; the log-sum-exp goes tile by tile (:mod:`selfsup.losses.blockwise`), so a large batch
never holds the whole 2N x 2N similarity matrix.

``negative_keys`` adds K more negatives to every anchor's denominator (SimCLR v2's memory buffer,
Chen et al. 2020b, Section 2: the outputs of a moving-average network from earlier batches)::

    l(i, j) = -log  exp(s_ij / t) / ( sum_{k != i} exp(s_ik / t) + sum_{q=1..K} exp(sim(z_i, m_q) / t) )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_with_grad, rank, world_size
from selfsup.losses.blockwise import contrastive_logsumexp


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            gather_distributed: bool = False, block_size: int | None = None,
            negative_keys: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent over two views ``z1``, ``z2`` of shape (N, D); ``z1[i]`` and ``z2[i]`` are positives.

    With ``gather_distributed`` the views of every process are negatives too (gathered with their
    gradient); each process computes the loss of its own 2N anchors. ``block_size`` sets the tile
    of the 2N x 2N logits (:func:`selfsup.losses.blockwise.contrastive_logsumexp`): ``None``
    chooses, 0 computes them in one piece; the result and its gradient do not depend on it.
    ``negative_keys`` (K, D), optional: more negatives for every anchor, normalised here and given
    no gradient (a memory buffer; already global under DDP, so never gathered).
    """
    z1 = F.normalize(z1, dim=-1)
    z2 = F.normalize(z2, dim=-1)
    n = z1.shape[0]
    anchors = torch.cat([z1, z2], dim=0)
    if gather_distributed:
        processes, me = world_size(), rank()
        keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)], dim=0)
    else:
        processes, me, keys = 1, 0, anchors
    if negative_keys is not None:
        # Appended after the views, so the excluded positions below stay where they are.
        memory = F.normalize(negative_keys.detach(), dim=-1).to(keys.dtype)
        keys = torch.cat([keys, memory], dim=0)
    # Global positions of this process's anchors among the keys: [z1 of all | z2 of all].
    own = torch.arange(n, device=z1.device) + me * n
    anchor_positions = torch.cat([own, own + n * processes])
    log_denominator = contrastive_logsumexp(anchors, keys, temperature,
                                            excluded_key=anchor_positions, block_size=block_size)
    dtype = log_denominator.dtype
    positive = (z1.to(dtype) * z2.to(dtype)).sum(dim=-1) / temperature
    return (log_denominator - positive.repeat(2)).mean().to(z1.dtype)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`."""

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False,
                 block_size: int | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.block_size = block_size

    def forward(self, z1: torch.Tensor, z2: torch.Tensor,
                negative_keys: torch.Tensor | None = None) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature, self.gather_distributed, self.block_size,
                       negative_keys)
