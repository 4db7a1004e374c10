"""InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
Coding"), the loss of CPC and MoCo (He et al. 2020).

For a query q with one positive key k+ and negatives k-::

    L = -log  exp(q·k+ / t) / ( exp(q·k+ / t) + sum_{k-} exp(q·k- / t) )

computed as ``logsumexp([q·k+, q·k-_1, ...] / t) - q·k+ / t`` (never a raw sum of exponentials),
the log-sum-exp tile by tile (:mod:`selfsup.losses.blockwise`), so a large batch or queue never
holds the whole query x key matrix. Embeddings are L2-normalised first, so q·k is a cosine
similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_with_grad
from selfsup.losses.blockwise import accumulation_dtype, contrastive_logsumexp


def info_nce(query: torch.Tensor, positive_key: torch.Tensor,
             negative_keys: torch.Tensor | None = None, temperature: float = 0.07,
             gather_distributed: bool = False, block_size: int | None = None) -> torch.Tensor:
    """InfoNCE loss, averaged over queries.

    Args:
        query: (N, D) queries.
        positive_key: (N, D) the positive key of each query.
        negative_keys: (M, D) negatives shared by all queries (e.g. MoCo's queue). With ``None`` the
            other positive keys of the batch are the negatives (CPC / in-batch form).
        temperature: the softmax temperature t (> 0).
        gather_distributed: in-batch form only: use the keys of every process as negatives,
            with gradient flowing back to them.
        block_size: the tile of the query x key logits
            (:func:`selfsup.losses.blockwise.contrastive_logsumexp`): ``None`` chooses, 0 computes
            them in one piece; the result and its gradient do not depend on it.
    """
    query = F.normalize(query, dim=-1)
    positive_key = F.normalize(positive_key, dim=-1)
    dtype = accumulation_dtype(query, positive_key, negative_keys)
    positive = (query.to(dtype) * positive_key.to(dtype)).sum(dim=-1) / temperature
    if negative_keys is None:
        # The positive key is among the keys: no separate logit for it.
        keys = gather_with_grad(positive_key) if gather_distributed else positive_key
        log_denominator = contrastive_logsumexp(query, keys, temperature, block_size=block_size)
    else:
        log_denominator = contrastive_logsumexp(query, F.normalize(negative_keys, dim=-1),
                                                temperature, extra_logit=positive,
                                                block_size=block_size)
    return (log_denominator - positive).mean().to(query.dtype)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`."""

    def __init__(self, temperature: float = 0.07, gather_distributed: bool = False,
                 block_size: int | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.block_size = block_size

    def forward(self, query: torch.Tensor, positive_key: torch.Tensor,
                negative_keys: torch.Tensor | None = None) -> torch.Tensor:
        return info_nce(query, positive_key, negative_keys, self.temperature,
                        self.gather_distributed, self.block_size)
