"""Supervised contrastive loss, SupCon (Khosla et al. 2020, "Supervised Contrastive Learning",
eq. 2, the L_out form the paper recommends).

Every view of every sample is an anchor ("all" contrast mode). With A(i) the other views of the
batch and P(i) those of A(i) that share anchor i's label::

    L = 1/|I'| * sum_{i in I'}  -1/|P(i)| * sum_{p in P(i)} log  exp(z_i·z_p / t)
                                                         / sum_{a in A(i)} exp(z_i·z_a / t)

where I' is the set of anchors with at least one positive. The embeddings are L2-normalised here
(the SupContrast reference expects them normalised). Paper default t = 0.1; the reference also
multiplies by t / base_temperature with base_temperature = 0.07, which ``base_temperature`` enables.
With ``labels=None`` each sample is its own class, so the positives are its other views and the
loss is SimCLR's NT-Xent.

Computed per anchor as ``logsumexp_{a in A(i)}(z_i·z_a / t) - mean_{p in P(i)} z_i·z_p / t``: the
log-sum-exp tile by tile (:mod:`selfsup.losses.blockwise`), the mean from per-class sums of the
embeddings, so a large batch never holds the whole anchor x contrast matrix.

Anchors without a positive (a class that appears once, with one view): their term is 0/0 in the
equation, so they are left out of I' and of the mean (the reference instead counts them as 0 in the
mean, which dilutes the loss by their share). If no anchor has a positive the loss is 0, still
attached to the graph so ``backward`` works and gives zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_no_grad, gather_with_grad, rank, world_size
from selfsup.losses.blockwise import contrastive_logsumexp


def supcon(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.1,
           base_temperature: float | None = None, gather_distributed: bool = False,
           block_size: int | None = None) -> torch.Tensor:
    """SupCon loss of ``features`` shaped (N, n_views, D) with class ``labels`` shaped (N,).

    With ``gather_distributed`` the anchors are this process's views and the contrast set (and
    labels, gathered without gradient) comes from every process; the features are gathered with
    their gradient. ``block_size`` sets the tile of the anchor x contrast logits
    (:func:`selfsup.losses.blockwise.contrastive_logsumexp`): ``None`` chooses, 0 computes them in
    one piece; the result and its gradient do not depend on it.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (N, n_views, D), got shape {tuple(features.shape)}")
    n, views, _ = features.shape
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be (N,) = ({n},), got shape {tuple(labels.shape)}")
    features = F.normalize(features, dim=-1)
    processes, me = (world_size(), rank()) if gather_distributed else (1, 0)
    everyone = gather_with_grad(features) if gather_distributed else features
    own = torch.arange(n, device=features.device) + me * n
    if labels is None:
        # Sample identity is the label: positives are exactly the other views of the same sample.
        labels, contrast_labels = own, torch.arange(n * processes, device=features.device)
    else:
        contrast_labels = gather_no_grad(labels) if gather_distributed else labels
    # View-major layout, as the reference's torch.cat(torch.unbind(features, dim=1)).
    anchors = features.transpose(0, 1).reshape(views * n, -1)
    contrast = (everyone.transpose(0, 1).reshape(views * n * processes, -1) if processes > 1
                else anchors)
    anchor_positions = (own.unsqueeze(0)
                        + n * processes * torch.arange(views, device=features.device).unsqueeze(1)
                        ).reshape(-1)
    log_denominator = contrastive_logsumexp(anchors, contrast, temperature,
                                            excluded_key=anchor_positions, block_size=block_size)
    dtype = log_denominator.dtype

    # The positives' logits without the anchor x contrast matrix, summed per class: for the
    # anchors i of class c, sum_i sum_{p in P(i)} a_i·k_p = A_c·S_c - sum_i a_i·(i's own key),
    # with A_c and S_c the sums of the class's anchors and keys. Every anchor of c has
    # |S_c| - 1 positives, so the means over P(i) add up per class too. Only class sums are
    # formed (index_add, whose backward is a gather): a per-anchor gather of S_c would need a
    # scatter-add in backward, which on CPU adds in a thread-dependent order and made SupCon
    # runs differ in the last bits.
    classes, inverse = torch.unique(torch.cat([contrast_labels, labels]), return_inverse=True)
    contrast_class = inverse[:contrast_labels.numel()].repeat(views)
    anchor_class = inverse[contrast_labels.numel():].repeat(views)
    contrast, anchors = contrast.to(dtype), anchors.to(dtype)
    num_classes, dim = classes.numel(), contrast.shape[1]
    key_sums = contrast.new_zeros(num_classes, dim).index_add(0, contrast_class, contrast)
    anchor_sums = anchors.new_zeros(num_classes, dim).index_add(0, anchor_class, anchors)
    own_logits = (anchors * contrast[anchor_positions]).sum(dim=-1)
    own_per_class = own_logits.new_zeros(num_classes).index_add(0, anchor_class, own_logits)
    positives_per_anchor = torch.bincount(contrast_class, minlength=num_classes) - 1
    class_positive_logits = ((anchor_sums * key_sums).sum(dim=-1) - own_per_class) / temperature
    class_term = torch.where(positives_per_anchor > 0,
                             class_positive_logits / positives_per_anchor.clamp(min=1), 0.0)
    has_positive = positives_per_anchor[anchor_class] > 0
    # -mean over P(i) of log_prob = lse_i - mean over P(i) of the positive logits. torch.where,
    # not a product with the mask: lse is -inf for an anchor with nothing to contrast.
    loss = ((torch.where(has_positive, log_denominator, 0.0).sum() - class_term.sum())
            / has_positive.sum().clamp(min=1))
    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss.to(features.dtype)


class SupConLoss(nn.Module):
    """Module form of :func:`supcon`."""

    def __init__(self, temperature: float = 0.1, base_temperature: float | None = None,
                 gather_distributed: bool = False, block_size: int | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.base_temperature = base_temperature
        self.gather_distributed = gather_distributed
        self.block_size = block_size

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return supcon(features, labels, self.temperature, self.base_temperature,
                      self.gather_distributed, self.block_size)
