"""The distillation loss of SimCLR v2 (Chen, Kornblith, Swersky, Norouzi & Hinton 2020, "Big
Self-Supervised Models are Strong Semi-Supervised Learners", NeurIPS, eq. 2), after Hinton,
Vinyals & Dean 2015.

With P(y | x; t) = exp(f(x)[y] / t) / sum_y' exp(f(x)[y'] / t) for the teacher's (T) and the
student's (S) logits f, on unlabeled examples x_i::

    L = - sum_i  sum_y  P^T(y | x_i; t)  log P^S(y | x_i; t)

the cross-entropy from the teacher's softened distribution to the student's. The teacher is
fixed: its logits get no gradient. We average over the batch instead of summing (a constant
factor, which the learning rate absorbs). The paper sets t = 0.1 for self-distillation (student
architecture = teacher's) and t = 1 for distilling a big teacher into a small student (Section 4).
Computed from ``log_softmax`` (never a raw exponential), in float32 at least: with t = 0.1,
bf16's rounding of the logits would be amplified ten-fold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float = 0.1) -> torch.Tensor:
    """Eq. 2 averaged over the N rows of ``student_logits`` and ``teacher_logits`` (N, classes).

    Returns float64 for float64 inputs, float32 otherwise. ``teacher_logits`` is detached.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    teacher = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return -(teacher * student).sum(dim=-1).mean()


class DistillationLoss(nn.Module):
    """Module form of :func:`distillation`."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
                ) -> torch.Tensor:
        return distillation(student_logits, teacher_logits, self.temperature)
