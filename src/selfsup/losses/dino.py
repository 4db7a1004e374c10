"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", ICCV):
self-distillation with no labels.

Each network output is turned into a distribution over K dimensions by a softmax with a
temperature: the student's ``P_s(x) = softmax(g_s(x) / tau_s)``, the teacher's, centred and
sharper, ``P_t(x) = softmax((g_t(x) - C) / tau_t)``. The student matches the teacher by the
cross-entropy ``H(a, b) = - sum_k a_k log b_k`` (Algorithm 1, where the teacher side is a stop
gradient), over multi-crop pairs (Section 3.1, eq. 3)::

    sum_{x in {x1g, x2g}}  sum_{x' in V, x' != x}  H(P_t(x), P_s(x'))

the teacher seeing only the global crops, the student every crop but the same one; as in the
reference ``DINOLoss`` (facebookresearch/dino, ``main_dino.py``) the sum is averaged over the
pairs and each pair's cross-entropy over the batch. Defaults: tau_s = 0.1, tau_t = 0.04 (the start
of the paper's warm-up to 0.07).

The softmaxes run in float32 on bfloat16 / float16 logits: divided by tau_t = 0.04, a logit's bf16
rounding error grows 25-fold, and the reference's half-precision runs have NaN and collapse reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.losses.blockwise import accumulation_dtype


def dino(student_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
         center: torch.Tensor, student_temperature: float = 0.1,
         teacher_temperature: float = 0.04) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's and the student's distributions.

    Args:
        student_logits: V tensors (B, K), the student's outputs of every crop, the teacher's
            crops first (crop i of the teacher is crop i of the student).
        teacher_logits: G <= V tensors (B, K), the teacher's outputs of the global crops; no
            gradient flows into them.
        center: (K,) or (1, K), the centre C subtracted from the teacher's outputs.
        student_temperature: tau_s.
        teacher_temperature: tau_t.

    Returns the mean over the G (V - 1) pairs, in float32 for half-precision logits (float64 for
    float64 logits): a bf16 loss near log K ~ 11 would be rounded by 0.03.
    """
    if not teacher_logits:
        raise ValueError("dino needs at least one teacher crop, got none")
    if len(teacher_logits) > len(student_logits):
        raise ValueError(f"dino's teacher crops must be student crops too: got "
                         f"{len(teacher_logits)} teacher and {len(student_logits)} student crops")
    if len(student_logits) < 2:
        raise ValueError(f"dino needs at least 2 crops to pair, got {len(student_logits)}")
    dtype = accumulation_dtype(*student_logits, *teacher_logits, center)
    center = center.detach().to(dtype)
    targets = [F.softmax((t.detach().to(dtype) - center) / teacher_temperature, dim=-1)
               for t in teacher_logits]
    log_predictions = [F.log_softmax(s.to(dtype) / student_temperature, dim=-1)
                       for s in student_logits]
    pairs = [(i, v) for i in range(len(targets)) for v in range(len(log_predictions)) if v != i]
    total = sum(-(targets[i] * log_predictions[v]).sum(dim=-1).mean() for i, v in pairs)
    return total / len(pairs)


class DINOLoss(nn.Module):
    """Module form of :func:`dino`; the centre, which moves with training, is an argument."""

    def __init__(self, student_temperature: float = 0.1, teacher_temperature: float = 0.04
                 ) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature

    def forward(self, student_logits: Sequence[torch.Tensor],
                teacher_logits: Sequence[torch.Tensor], center: torch.Tensor) -> torch.Tensor:
        return dino(student_logits, teacher_logits, center, self.student_temperature,
                    self.teacher_temperature)
