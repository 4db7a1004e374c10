"""Debiased contrastive loss (Chuang et al. 2020, "Debiased Contrastive Learning", the debiased
objective of Sec. 4 with its clamped estimator).

In-batch negatives are drawn from the data distribution, so with class prior tau+ a fraction tau+
of them are really positives. The debiased loss corrects the negative term: for an anchor with
positive logit l+ = s+/t and N negative logits l_j = s_j/t::

    g  = max( 1/(1 - tau+) * ( 1/N * sum_j exp(l_j) - tau+ * exp(l+) ),  exp(-1/t) )
    L  = -log  exp(l+) / ( exp(l+) + N * g )

The clamp at exp(-1/t), the smallest value exp(s/t) takes on the unit sphere, keeps the estimate
positive. N = 2B - 2 for a batch of B pairs in the SimCLR arrangement. tau+ = 0 gives back
NT-Xent. Paper defaults (CIFAR-10): tau+ = 0.1, t = 0.5.

Not to be confused with lightly's ``DCLLoss``, which is Decoupled Contrastive Learning (Yeh et al.
2021), a different paper that drops the positive from the denominator.

Computed in log space: log sum_j exp(l_j) is a log-sum-exp, the subtraction of tau+ * exp(l+) is a
log-sub-exp (``expm1``), the clamp a max of logs and the final ratio a ``logaddexp``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from selfsup.losses._two_view import positive_and_negative_logits, require_negatives


def log_debiased_negative_term(log_negative_sum: torch.Tensor, positives: torch.Tensor,
                               num_negatives: int, tau_plus: float,
                               temperature: float) -> torch.Tensor:
    """log(N * g) of Chuang et al. from log sum_j exp(l_j) (or a reweighted sum of the same scale).

    N * g = max( (sum_j exp(l_j) - N * tau+ * exp(l+)) / (1 - tau+),  N * exp(-1/t) ).
    """
    log_false_negatives = (positives + math.log(num_negatives * tau_plus) if tau_plus > 0
                           else torch.full_like(positives, float("-inf")))
    gap = log_false_negatives - log_negative_sum
    estimate_is_positive = gap < 0
    # log(e^a - e^b) = a + log(-expm1(b - a)). Where the difference is <= 0 the clamp takes over,
    # but torch.where still backpropagates zeros through the discarded branch, so that branch is
    # fed a harmless gap to keep 0 * inf out of the gradient.
    safe_gap = torch.where(estimate_is_positive, gap, -1.0)
    log_estimate = log_negative_sum + torch.log(-torch.expm1(safe_gap)) - math.log1p(-tau_plus)
    log_estimate = torch.where(estimate_is_positive, log_estimate, float("-inf"))
    return torch.clamp(log_estimate, min=math.log(num_negatives) - 1.0 / temperature)


def debiased_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau_plus: float = 0.1,
                     temperature: float = 0.5, gather_distributed: bool = False) -> torch.Tensor:
    """Debiased NT-Xent over two views ``z1``, ``z2`` of shape (B, D), averaged over the 2B anchors.

    ``tau_plus`` is the class prior tau+ in [0, 1). With ``gather_distributed`` the negatives (and
    N) include the views of every process, as in :func:`selfsup.losses.nt_xent`. Needs B >= 2.
    """
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    positives, negatives = positive_and_negative_logits(z1, z2, temperature, gather_distributed)
    require_negatives(negatives, "debiased_nt_xent")
    log_negative_term = log_debiased_negative_term(torch.logsumexp(negatives, dim=1), positives,
                                                   negatives.shape[1], tau_plus, temperature)
    return (torch.logaddexp(positives, log_negative_term) - positives).mean()


class DebiasedNTXentLoss(nn.Module):
    """Module form of :func:`debiased_nt_xent`."""

    def __init__(self, tau_plus: float = 0.1, temperature: float = 0.5,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        self.tau_plus = tau_plus
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return debiased_nt_xent(z1, z2, self.tau_plus, self.temperature, self.gather_distributed)
