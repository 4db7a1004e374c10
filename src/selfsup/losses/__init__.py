"""Losses of the contrastive-learning literature: pure functions on tensors, one file per family,
each also usable as an ``nn.Module``."""

from selfsup.losses.alignment_uniformity import (AlignmentLoss, AlignUniformLoss, UniformityLoss,
                                                 align_uniform_loss, alignment, uniformity)
from selfsup.losses.barlow_twins import BarlowTwinsLoss, barlow_twins
from selfsup.losses.debiased import DebiasedNTXentLoss, debiased_nt_xent
from selfsup.losses.dino import DINOLoss, dino
from selfsup.losses.distillation import DistillationLoss, distillation
from selfsup.losses.flat_nce import FlatNCELoss, flat_nce
from selfsup.losses.hard_negative import HardNegativeNTXentLoss, hard_negative_nt_xent
from selfsup.losses.info_nce import InfoNCELoss, info_nce
from selfsup.losses.invaspread import InvaSpreadLoss, invaspread
from selfsup.losses.nce import MemoryBankSoftmaxLoss, NCELoss, memory_bank_softmax, nce
from selfsup.losses.negative_cosine import (NegativeCosineLoss, NormalizedMSELoss,
                                            negative_cosine, normalized_mse)
from selfsup.losses.nt_xent import NTXentLoss, nt_xent
from selfsup.losses.pixpro import PixProLoss, pixpro, positive_pixel_pairs
from selfsup.losses.supcon import SupConLoss, supcon
from selfsup.losses.swav import SwAVLoss, sinkhorn, swav
from selfsup.losses.triplet import NPairLoss, TripletLoss, n_pair, triplet

__all__ = [
    "negative_cosine", "NegativeCosineLoss", "normalized_mse", "NormalizedMSELoss",
    "barlow_twins", "BarlowTwinsLoss",
    "swav", "SwAVLoss", "sinkhorn",
    "dino", "DINOLoss",
    "pixpro", "PixProLoss", "positive_pixel_pairs",
    "distillation", "DistillationLoss",
    "info_nce", "InfoNCELoss", "nt_xent", "NTXentLoss",
    "supcon", "SupConLoss",
    "nce", "NCELoss", "memory_bank_softmax", "MemoryBankSoftmaxLoss",
    "invaspread", "InvaSpreadLoss",
    "debiased_nt_xent", "DebiasedNTXentLoss",
    "hard_negative_nt_xent", "HardNegativeNTXentLoss",
    "flat_nce", "FlatNCELoss",
    "alignment", "AlignmentLoss", "uniformity", "UniformityLoss",
    "align_uniform_loss", "AlignUniformLoss",
    "triplet", "TripletLoss", "n_pair", "NPairLoss",
]
