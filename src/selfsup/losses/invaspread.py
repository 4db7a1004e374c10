"""Invariant and spreading instance loss, InvaSpread (Ye et al. 2019, "Unsupervised Embedding
Learning via Invariant and Spreading Instance Feature", CVPR, eq. 2-5).

In a batch of m instances with L2-normalised features f_1..f_m and f̂_i the feature of an augmented
copy x̂_i of instance i, the instance classifier is a softmax over the batch's own features::

    P(i | x̂_i) = exp(f_i·f̂_i / t) / sum_{k=1..m} exp(f_k·f̂_i / t)                 (eq. 2)
    P(i | x_j)  = exp(f_i·f_j / t) / sum_{k=1..m} exp(f_k·f_j / t)                   (eq. 3)

and the loss (eq. 5) pulls each augmented copy to its instance (invariance) while every other
instance j is pushed away from being classified as i (spreading)::

    J = - sum_i log P(i | x̂_i)  -  sum_i sum_{j != i} log(1 - P(i | x_j))

exactly with both sums, as the paper and the survey write it. The sums over k include k = i in
eq. 2 and k = j in eq. 3. We divide J by the batch size m (the reference code divides by it too),
so the value does not grow with the batch. Paper default t = 0.1.

Numerics: log P comes from a log-sum-exp; log(1 - P) from ``log1p(-exp(log P))``. For unit
vectors f_i·f_j <= f_j·f_j, so the k = j term of eq. 3's denominator bounds P(i | x_j) <= 1/2 and
log(1 - P) stays finite without any clamp.

Note: the authors' code (mangye16/Unsupervised_Embedding_Learning) computes a symmetrised variant
over the 2m features with the self term left out of the denominators; this is the paper's equation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_with_grad, local_rows


def invaspread(features: torch.Tensor, augmented_features: torch.Tensor,
               temperature: float = 0.1, gather_distributed: bool = False) -> torch.Tensor:
    """InvaSpread loss J / m of ``features`` f (m, D) and ``augmented_features`` f̂ (m, D).

    Both are L2-normalised here, and both receive gradient (the paper's features are computed
    in the batch, no memory bank). With ``gather_distributed`` the sums over k and over i run over
    the features of every process (gathered with their gradient); the terms of this process's
    instances are averaged, so the mean over processes is J / m of the global batch.
    """
    if features.shape != augmented_features.shape or features.dim() != 2:
        raise ValueError(f"features and augmented_features must both be (m, D), got "
                         f"{tuple(features.shape)} and {tuple(augmented_features.shape)}")
    # In float32 (or float64) whatever the autocast: in bf16, f_i·f_j / t at t = 0.1 carries errors of ~0.05,
    # which the spreading term's log(1 - P) amplifies where P is near 1/2.
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        return _invaspread(features.to(dtype), augmented_features.to(dtype), temperature,
                           gather_distributed)


def _invaspread(features: torch.Tensor, augmented_features: torch.Tensor, temperature: float,
                gather_distributed: bool) -> torch.Tensor:
    features = F.normalize(features, dim=-1)
    augmented_features = F.normalize(augmented_features, dim=-1)
    everyone = gather_with_grad(features) if gather_distributed else features
    rows = local_rows(everyone.shape[0]) if gather_distributed else slice(0, everyone.shape[0])
    own = torch.arange(rows.start, rows.stop, device=features.device)
    local = torch.arange(features.shape[0], device=features.device)

    # Invariance: row i holds f_k·f̂_i / t for every k; log P(i | x̂_i) is its entry k = i.
    augmented_logits = augmented_features @ everyone.transpose(0, 1) / temperature
    log_p_invariant = (augmented_logits[local, own]
                       - torch.logsumexp(augmented_logits, dim=1))
    # Spreading: row j holds log P(i | x_j) for every instance i; the entry i = j is left out.
    logits = features @ everyone.transpose(0, 1) / temperature
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    others = torch.ones_like(log_p, dtype=torch.bool)
    others[local, own] = False
    # Masked before log1p, not after: P(j | x_j) on the left-out diagonal can be 1 in floating
    # point (a confident instance), and log1p's gradient there, inf, times a where's zero would
    # be NaN. exp(-inf) = 0 gives log(1 - 0) = 0 and a zero gradient.
    log_not_p = torch.log1p(-torch.exp(log_p.masked_fill(~others, float("-inf"))))
    return -(log_p_invariant + log_not_p.sum(dim=1)).mean()


class InvaSpreadLoss(nn.Module):
    """Module form of :func:`invaspread`."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, features: torch.Tensor, augmented_features: torch.Tensor) -> torch.Tensor:
        return invaspread(features, augmented_features, self.temperature,
                          self.gather_distributed)
