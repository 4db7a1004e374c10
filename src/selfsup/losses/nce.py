"""Noise-contrastive estimation with a memory bank, InstDisc (Wu et al. 2018, "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", eq. 2-6).

The non-parametric softmax (eq. 2) over the n instances of the memory bank, with memory v_j::

    P(i | v) = exp(v_i·v / t) / sum_j exp(v_j·v / t)

and its objective -sum_i log P(i | v_i) (eq. 3) are what :func:`memory_bank_softmax` computes, as a
cross-entropy with the sample's own index as target (the full-softmax form later memory-bank
methods use when n is affordable). NCE avoids the sum over the bank. With M noise samples drawn
from the uniform noise distribution Pn = 1/n and ``scores`` the unnormalised
P(i|v) = exp(v_i·v / t) / Z (eq. 4, Z a Monte-Carlo estimate)::

    h(i, v) = P(i|v) / (P(i|v) + M·Pn)                                      (eq. 5)
    J_NCE   = -E_data[ log h(i, v) ] - M · E_noise[ log(1 - h(i, v')) ]      (eq. 6)

with the noise expectation estimated by the M drawn samples (a sum over them). Paper defaults:
t = 0.07, M = 4096, Pn = 1/n with n the dataset size. Both log h and log(1 - h) are computed from
log P and log(M·Pn) with ``logaddexp``, so neither saturates to log 0 as h approaches 0 or 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def nce(scores: torch.Tensor, noise_probability: float | torch.Tensor,
        num_noise: int) -> torch.Tensor:
    """Binary NCE loss of InstDisc, averaged over the batch.

    Args:
        scores: (B, 1 + M) unnormalised probabilities P(i|v) > 0: column 0 the data sample,
            columns 1..M the noise samples.
        noise_probability: Pn of each sample under the noise distribution (1/n for uniform noise
            over n instances); a float or a tensor that broadcasts against ``scores``.
        num_noise: M, the number of noise samples.

    A score of exactly 0 has log P = -inf; it is clamped to the dtype's smallest normal number so
    the loss stays large but finite and its gradient defined.
    """
    if scores.dim() != 2 or scores.shape[1] != 1 + num_noise:
        raise ValueError(f"scores must be (B, 1 + num_noise) = (B, {1 + num_noise}), "
                         f"got shape {tuple(scores.shape)}")
    log_scores = scores.clamp(min=torch.finfo(scores.dtype).tiny).log()
    if isinstance(noise_probability, torch.Tensor):
        log_noise = torch.log(noise_probability.to(scores)) + math.log(num_noise)
    else:
        log_noise = torch.tensor(math.log(num_noise * noise_probability), dtype=scores.dtype,
                                 device=scores.device)
    log_normaliser = torch.logaddexp(log_scores, log_noise)
    log_h = log_scores - log_normaliser  # log h = log P - log(P + M·Pn)
    log_one_minus_h = log_noise - log_normaliser  # log(1 - h) = log(M·Pn) - log(P + M·Pn)
    per_sample = -log_h[:, 0] - log_one_minus_h[:, 1:].sum(dim=1)
    return per_sample.mean()


def memory_bank_softmax(similarities: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 0.07) -> torch.Tensor:
    """Non-parametric softmax of InstDisc eq. 2-3: -log P(i|v) averaged over the batch.

    Args:
        similarities: (B, n) cosine similarities v_j·v of each sample with every memory entry
            (not yet divided by the temperature).
        targets: (B,) each sample's own index i in the memory bank.
        temperature: t (paper 0.07).
    """
    return F.cross_entropy(similarities / temperature, targets)


class NCELoss(nn.Module):
    """Module form of :func:`nce`."""

    def __init__(self, noise_probability: float, num_noise: int) -> None:
        super().__init__()
        self.noise_probability = noise_probability
        self.num_noise = num_noise

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return nce(scores, self.noise_probability, self.num_noise)


class MemoryBankSoftmaxLoss(nn.Module):
    """Module form of :func:`memory_bank_softmax`."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, similarities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return memory_bank_softmax(similarities, targets, self.temperature)
