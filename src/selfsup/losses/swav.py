"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS): online codes by Sinkhorn-Knopp, and the swapped prediction.

Codes (Section 3.1, eq. 3 and Appendix A.1): for the prototype scores ``C^T Z`` of B samples
against K prototypes, the code matrix ``Q`` maximises ``Tr(Q^T C^T Z) + eps H(Q)`` over the
transportation polytope (every prototype gets B/K samples, every sample a whole assignment). Its
solution ``Q = Diag(u) exp(C^T Z / eps) Diag(v)`` is found by a few Sinkhorn-Knopp iterations that
alternately rescale the K rows to 1/K and the B columns to 1/B; the columns are then rescaled to
sum to 1. Defaults: eps = 0.05, 3 iterations.

Swapped prediction (eq. 1-2): each view's code is predicted from every other view,
``l(z_t, q_s) = - sum_k q_s^(k) log softmax_k(z_t . c_k / T)``, T = 0.1, averaged over the batch,
over the other views and over the views that give codes (the two full-resolution crops; the
small multi-crop crops are only predicted from).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import is_distributed, world_size
from selfsup.losses.blockwise import accumulation_dtype


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, gather_distributed: bool = True
                ) -> torch.Tensor:
    if gather_distributed and is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             gather_distributed: bool = False) -> torch.Tensor:
    """SwAV's codes: the (B, K) assignment of B samples to K prototypes, each row summing to 1.

    Args:
        scores: (B, K) prototype scores ``z . c`` of the samples (no gradient flows through).
        epsilon: the entropy weight eps; exp(scores / eps) is the starting kernel.
        iterations: Sinkhorn-Knopp iterations (one row and one column rescaling each).
        gather_distributed: the samples of every process form one problem (the reference's
            ``distributed_sinkhorn``): the sums over samples are all-reduced.
    """
    dtype = accumulation_dtype(scores)
    scores = scores.detach().to(dtype)
    # Shift by the global maximum before exp: the first normalisation divides any constant factor
    # out, and exp never overflows, however small eps is.
    peak = _all_reduce(scores.max(), dist.ReduceOp.MAX, gather_distributed)
    q = torch.exp((scores - peak) / epsilon).t()  # K x B, as in the paper's notation
    prototypes = q.shape[0]
    samples = q.shape[1] * (world_size() if gather_distributed else 1)
    q /= _all_reduce(q.sum(), gather_distributed=gather_distributed)
    # A prototype (row) or sample (column) whose kernel underflowed to 0 everywhere (scores far
    # outside the cosine range) would divide 0 by 0: the sums are kept above the smallest normal.
    tiny = torch.finfo(dtype).tiny
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True),
                         gather_distributed=gather_distributed).clamp_min(tiny)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= samples
    return (q * samples).t()


def swav(scores: Sequence[torch.Tensor], temperature: float = 0.1, epsilon: float = 0.05,
         iterations: int = 3, num_code_views: int = 2,
         extra_code_scores: Sequence[torch.Tensor | None] | None = None,
         gather_distributed: bool = False) -> torch.Tensor:
    """The swapped-prediction loss over V views.

    Args:
        scores: V tensors (B, K): each view's scores ``z . c`` against the (normalised) prototypes;
            the first ``num_code_views`` views give codes.
        temperature: T of the softmax over prototypes.
        epsilon, iterations: of :func:`sinkhorn`.
        num_code_views: how many of the first views give codes (SwAV: the two 224-px crops).
        extra_code_scores: per code view, (M, K) scores of queued past features (or None): they
            join the Sinkhorn problem, to make it large enough with a small batch (Section 3.1,
            "working with small batches"), and get no code of their own.
        gather_distributed: solve each Sinkhorn problem over the samples of every process.
    """
    if len(scores) < 2:
        raise ValueError(f"swav needs at least 2 views, got {len(scores)}")
    if not 1 <= num_code_views <= len(scores):
        raise ValueError(f"num_code_views must be in [1, {len(scores)}], got {num_code_views}")
    extra = list(extra_code_scores) if extra_code_scores is not None else [None] * num_code_views
    dtype = accumulation_dtype(*scores)
    log_probabilities = [F.log_softmax(s.to(dtype) / temperature, dim=1) for s in scores]
    batch = scores[0].shape[0]
    loss = scores[0].new_zeros((), dtype=dtype)
    for code_view in range(num_code_views):
        problem = scores[code_view] if extra[code_view] is None else torch.cat(
            [extra[code_view].to(scores[code_view].dtype), scores[code_view]])
        codes = sinkhorn(problem, epsilon, iterations, gather_distributed)[-batch:]
        others = [v for v in range(len(scores)) if v != code_view]
        loss = loss + sum(-(codes * log_probabilities[v]).sum(dim=1).mean() for v in others
                          ) / len(others)
    return (loss / num_code_views).to(scores[0].dtype)


class SwAVLoss(nn.Module):
    """Module form of :func:`swav`."""

    def __init__(self, temperature: float = 0.1, epsilon: float = 0.05, iterations: int = 3,
                 num_code_views: int = 2, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.epsilon = epsilon
        self.iterations = iterations
        self.num_code_views = num_code_views
        self.gather_distributed = gather_distributed

    def forward(self, scores: Sequence[torch.Tensor],
                extra_code_scores: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        return swav(scores, self.temperature, self.epsilon, self.iterations, self.num_code_views,
                    extra_code_scores, self.gather_distributed)
