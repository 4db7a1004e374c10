"""Hard-negative contrastive loss, HCL (Robinson et al. 2021, "Contrastive Learning with Hard
Negative Samples", the importance-sampling estimator of Sec. 3 combined with the debiasing of
Chuang et al. 2020).

Negatives are sampled from q_beta(x-) ∝ exp(beta * s(x, x-)) p-(x-), which up-weights negatives
close to the anchor. With in-batch negatives this is importance sampling: for an anchor with
positive logit l+ = s+/t and N negative logits l_j = s_j/t::

    w_j = exp(beta * l_j) / ( 1/N * sum_k exp(beta * l_k) )               (mean 1 over j)
    g   = max( 1/(1 - tau+) * ( 1/N * sum_j w_j exp(l_j) - tau+ * exp(l+) ),  exp(-1/t) )
    L   = -log  exp(l+) / ( exp(l+) + N * g )

beta scales l_j = s_j/t, not s_j, as in the authors' code (``imp = (beta * neg.log()).exp()``), so
the paper's beta values apply unchanged. beta = 0 gives the debiased loss of Chuang et al., and
beta = 0 with tau+ = 0 gives NT-Xent. Paper defaults (CIFAR-10): beta = 1.0, tau+ = 0.1, t = 0.5.

In log space, log sum_j w_j exp(l_j) = logsumexp((1 + beta) l_j) - logsumexp(beta l_j) + log N; the
debiasing and clamp are those of :mod:`selfsup.losses.debiased`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from selfsup.losses._two_view import positive_and_negative_logits, require_negatives
from selfsup.losses.debiased import log_debiased_negative_term


def hard_negative_nt_xent(z1: torch.Tensor, z2: torch.Tensor, beta: float = 1.0,
                          tau_plus: float = 0.1, temperature: float = 0.5,
                          gather_distributed: bool = False) -> torch.Tensor:
    """Hard-negative NT-Xent over two views ``z1``, ``z2`` of shape (B, D), averaged over anchors.

    ``beta`` >= 0 is the concentration of the hard-negative distribution, ``tau_plus`` in [0, 1)
    the class prior. With ``gather_distributed`` the negatives include every process's views.
    Needs B >= 2.
    """
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    positives, negatives = positive_and_negative_logits(z1, z2, temperature, gather_distributed)
    require_negatives(negatives, "hard_negative_nt_xent")
    num_negatives = negatives.shape[1]
    # The weights are normalised per anchor; subtracting logsumexp(beta * l) is that
    # normalisation, and it keeps exp(beta * l) from overflowing for large beta / small t.
    log_reweighted_sum = (torch.logsumexp((1.0 + beta) * negatives, dim=1)
                          - torch.logsumexp(beta * negatives, dim=1) + math.log(num_negatives))
    log_negative_term = log_debiased_negative_term(log_reweighted_sum, positives, num_negatives,
                                                   tau_plus, temperature)
    return (torch.logaddexp(positives, log_negative_term) - positives).mean()


class HardNegativeNTXentLoss(nn.Module):
    """Module form of :func:`hard_negative_nt_xent`."""

    def __init__(self, beta: float = 1.0, tau_plus: float = 0.1, temperature: float = 0.5,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        self.beta = beta
        self.tau_plus = tau_plus
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return hard_negative_nt_xent(z1, z2, self.beta, self.tau_plus, self.temperature,
                                     self.gather_distributed)
