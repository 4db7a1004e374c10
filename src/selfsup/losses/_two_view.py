"""The SimCLR arrangement of two views, written once for the losses that reweight its terms
(debiased, hard-negative, FlatNCE): for each of the 2N anchors, the logit of its positive and the
logits of its 2N - 2 negatives, kept apart because those losses treat the two differently."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.distributed import gather_with_grad, rank, world_size


def positive_and_negative_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                                 gather_distributed: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine logits ``s / t`` of the anchors ``[z1; z2]``: positives (2N,), negatives (2N, K).

    ``z1[i]`` and ``z2[i]`` are each other's positive; every other view is a negative, so
    K = 2N - 2, or 2NP - 2 with ``gather_distributed`` over P processes (keys gathered with their
    gradient, anchors local, as in :func:`selfsup.losses.nt_xent`).
    """
    z1 = F.normalize(z1, dim=-1)
    z2 = F.normalize(z2, dim=-1)
    n = z1.shape[0]
    if gather_distributed:
        processes, me = world_size(), rank()
        keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)], dim=0)
    else:
        processes, me = 1, 0
        keys = torch.cat([z1, z2], dim=0)
    anchors = torch.cat([z1, z2], dim=0)
    logits = anchors @ keys.transpose(0, 1) / temperature
    half = n * processes
    own = torch.arange(n, device=z1.device) + me * n
    rows = torch.arange(2 * n, device=z1.device)
    anchor_positions = torch.cat([own, own + half])
    positive_positions = torch.cat([own + half, own])
    positives = logits[rows, positive_positions]
    not_negative = torch.zeros_like(logits, dtype=torch.bool)
    not_negative[rows, anchor_positions] = True
    not_negative[rows, positive_positions] = True
    # Boolean indexing keeps row order, and every row drops exactly two entries.
    negatives = logits[~not_negative].view(2 * n, 2 * half - 2)
    return positives, negatives


def require_negatives(negatives: torch.Tensor, loss_name: str) -> None:
    """These losses average over negatives, which a one-sample batch does not have."""
    if negatives.shape[1] == 0:
        raise ValueError(f"{loss_name} needs at least one negative: a batch of 2 or more samples")
