"""InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
Coding"), the loss of CPC and MoCo (He et al. 2020).

For a query q with one positive key k+ and negatives k-::

    L = -log  exp(q·k+ / t) / ( exp(q·k+ / t) + sum_{k-} exp(q·k- / t) )

computed as a cross-entropy over the logits ``[q·k+, q·k-_1, ...] / t`` (log-sum-exp inside, never
a raw sum of exponentials). Embeddings are L2-normalised first, so q·k is a cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_with_grad, local_rows


def info_nce(query: torch.Tensor, positive_key: torch.Tensor,
             negative_keys: torch.Tensor | None = None, temperature: float = 0.07,
             gather_distributed: bool = False) -> torch.Tensor:
    """InfoNCE loss, averaged over queries.

    Args:
        query: (N, D) queries.
        positive_key: (N, D) the positive key of each query.
        negative_keys: (M, D) negatives shared by all queries (e.g. MoCo's queue). With ``None`` the
            other positive keys of the batch are the negatives (CPC / in-batch form).
        temperature: the softmax temperature t (> 0).
        gather_distributed: in-batch form only: use the keys of every process as negatives,
            with gradient flowing back to them.
    """
    query = F.normalize(query, dim=-1)
    positive_key = F.normalize(positive_key, dim=-1)
    if negative_keys is None:
        keys = gather_with_grad(positive_key) if gather_distributed else positive_key
        logits = query @ keys.transpose(0, 1) / temperature
        rows = local_rows(keys.shape[0]) if gather_distributed else slice(0, keys.shape[0])
        labels = torch.arange(rows.start, rows.stop, device=query.device)
        return F.cross_entropy(logits, labels)
    negative_keys = F.normalize(negative_keys, dim=-1)
    positive_logit = (query * positive_key).sum(dim=-1, keepdim=True)
    negative_logits = query @ negative_keys.transpose(0, 1).to(query.dtype)
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`."""

    def __init__(self, temperature: float = 0.07, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, query: torch.Tensor, positive_key: torch.Tensor,
                negative_keys: torch.Tensor | None = None) -> torch.Tensor:
        return info_nce(query, positive_key, negative_keys, self.temperature,
                        self.gather_distributed)
