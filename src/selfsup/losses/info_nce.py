"""InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
Coding"), the loss of CPC and MoCo (He et al. 2020).

For a query q with one positive key k+ and negatives k-::

    L = -log  exp(q·k+ / t) / ( exp(q·k+ / t) + sum_{k-} exp(q·k- / t) )

computed as ``logsumexp([q·k+, q·k-_1, ...] / t) - q·k+ / t`` (never a raw sum of exponentials),
the log-sum-exp tile by tile (:mod:`selfsup.losses.blockwise`), so a large batch or queue never
holds the whole query x key matrix. Embeddings are L2-normalised first, so q·k is a cosine
similarity; ``normalize=False`` keeps the raw dot product, the bilinear score ``z^T W_k c`` of CPC
(Hénaff et al. 2020, eq. 2), whose scale the predictions learn.

CPC's negatives are all the patches of the batch, the positive among them: ``positive_index`` says
where each query's positive sits in ``negative_keys``, and that key is left out of the query's
negatives, so the denominator holds it once, as the positive (the paper's ``{z_l}`` are the
*other* patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_with_grad
from selfsup.losses.blockwise import accumulation_dtype, contrastive_logsumexp


def info_nce(query: torch.Tensor, positive_key: torch.Tensor,
             negative_keys: torch.Tensor | None = None, temperature: float = 0.07,
             gather_distributed: bool = False, block_size: int | None = None,
             normalize: bool = True, positive_index: torch.Tensor | None = None) -> torch.Tensor:
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
        normalize: L2-normalise queries and keys (cosine similarity); False: raw dot products.
        positive_index: (N,) int, with ``negative_keys`` only: row of ``negative_keys`` that is
            each query's positive (``positive_key`` equals those rows); it is excluded from that
            query's negatives, so it enters the denominator once.
    """
    if positive_index is not None and negative_keys is None:
        raise ValueError("positive_index locates the positives among negative_keys: "
                         "pass negative_keys too")
    if normalize:
        query = F.normalize(query, dim=-1)
        positive_key = F.normalize(positive_key, dim=-1)
        if negative_keys is not None:
            negative_keys = F.normalize(negative_keys, dim=-1)
    dtype = accumulation_dtype(query, positive_key, negative_keys)
    positive = (query.to(dtype) * positive_key.to(dtype)).sum(dim=-1) / temperature
    if negative_keys is None:
        # The positive key is among the keys: no separate logit for it.
        keys = gather_with_grad(positive_key) if gather_distributed else positive_key
        log_denominator = contrastive_logsumexp(query, keys, temperature, block_size=block_size)
    else:
        log_denominator = contrastive_logsumexp(query, negative_keys, temperature,
                                                excluded_key=positive_index,
                                                extra_logit=positive, block_size=block_size)
    return (log_denominator - positive).mean().to(query.dtype)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`."""

    def __init__(self, temperature: float = 0.07, gather_distributed: bool = False,
                 block_size: int | None = None, normalize: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.block_size = block_size
        self.normalize = normalize

    def forward(self, query: torch.Tensor, positive_key: torch.Tensor,
                negative_keys: torch.Tensor | None = None,
                positive_index: torch.Tensor | None = None) -> torch.Tensor:
        return info_nce(query, positive_key, negative_keys, self.temperature,
                        self.gather_distributed, self.block_size, self.normalize, positive_index)
