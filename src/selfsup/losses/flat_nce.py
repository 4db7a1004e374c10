"""FlatNCE (Chen et al. 2021, "Simpler, Faster, Stronger: Breaking The log-K Curse On Contrastive
Learners With FlatNCE", Algorithm 1).

For an anchor with positive logit l+ = s+/t and negative logits l_j = s_j/t (the SimCLR
arrangement, 2B - 2 negatives)::

    v = logsumexp_j (l_j - l+)  =  -log  exp(l+) / sum_j exp(l_j)
    L = 1/(2B) * sum_anchors v

The value is v, the "seed" contrastive term without the positive in the denominator, and the
gradient is its gradient, grad v. Algorithm 1 obtains that gradient from the surrogate
``exp(v - v.detach())``, whose value is 1 and whose gradient is exp(0) * grad v. Here the surrogate
is ``v.detach() + expm1(v - v.detach())`` so the reported value is v itself (expm1(0) is exactly 0,
so nothing is lost to rounding however small v is). For autograd this is the same as returning v;
the surrogate form is kept so the code reads as Algorithm 1 does.

Relation to NT-Xent: per anchor NT-Xent is log(1 + exp(v)) = softplus(v), whose gradient is
sigmoid(v) * grad v = (1 - p+) * grad v, with p+ the softmax probability of the positive. So
FlatNCE's gradient is NT-Xent's divided by (1 - p+) anchor by anchor: the same direction per
anchor, self-normalised. When the positive dominates (small batches, p+ -> 1) the NT-Xent gradient
vanishes into rounding error while FlatNCE's does not: the paper's account of why small-batch
InfoNCE stalls.
The mean over anchors is not a multiple of NT-Xent's gradient, since 1 - p+ differs per anchor.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.losses._two_view import positive_and_negative_logits, require_negatives


def flat_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
             gather_distributed: bool = False) -> torch.Tensor:
    """FlatNCE over two views ``z1``, ``z2`` of shape (B, D): value mean_anchors logsumexp(l- - l+).

    With ``gather_distributed`` the negatives include every process's views. Needs B >= 2 (with
    no negative, logsumexp over nothing is -inf).
    """
    positives, negatives = positive_and_negative_logits(z1, z2, temperature, gather_distributed)
    require_negatives(negatives, "flat_nce")
    v = torch.logsumexp(negatives - positives.unsqueeze(1), dim=1)
    return (v.detach() + torch.expm1(v - v.detach())).mean()


class FlatNCELoss(nn.Module):
    """Module form of :func:`flat_nce`."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return flat_nce(z1, z2, self.temperature, self.gather_distributed)
