"""Losses of the contrastive-learning literature: pure functions on tensors, one file per family,
each also usable as an ``nn.Module``."""

from selfsup.losses.info_nce import InfoNCELoss, info_nce
from selfsup.losses.nt_xent import NTXentLoss, nt_xent

__all__ = ["info_nce", "InfoNCELoss", "nt_xent", "NTXentLoss"]
