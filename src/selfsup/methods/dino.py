from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from selfsup.distributed import gather_no_grad, world_size
from selfsup.ema import MomentumCopy, cosine_momentum
from selfsup.heads import DINOHead
from selfsup.losses import dino
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method
from selfsup.methods.swav import resolution_groups

# The teacher sees the two global crops, which come first in the `dino` recipe.
NUM_GLOBAL_CROPS = 2


@torch.no_grad()
def clip_each_gradient(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale every gradient whose own L2 norm exceeds ``max_norm`` down to it (the DINO
    reference's ``utils.clip_gradients``: per tensor, ``max_norm / (norm + 1e-6)``)."""
    for parameter in parameters:
        if parameter.grad is None:
            continue
        scale = max_norm / (parameter.grad.norm(2) + 1e-6)
        parameter.grad.mul_(scale.clamp(max=1.0))


@register_method
class DINO(Method):
    """DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
    ICCV): self-distillation with no labels.

    A student (backbone + :class:`~selfsup.heads.DINOHead`) and a teacher of the same
    architecture, a momentum copy of the student without gradient (``theta_t <- m theta_t +
    (1 - m) theta_s``, m rising from 0.996 to 1 on a cosine). The teacher encodes the 2 global
    crops, the student every crop (multi-crop, Section 3.1); the student matches the teacher's
    centred, sharpened distributions by cross-entropy (:func:`selfsup.losses.dino`, Algorithm 1
    and eq. 3). Collapse is avoided by the two together (Section 3.1, "Avoiding collapse"):

    - centring: the centre C, a persistent buffer, moves after every step as
      ``C <- 0.9 C + 0.1 mean(g_t)`` over the teacher's outputs of the global crops of the whole
      batch, every process included;
    - sharpening: the teacher's temperature warms up linearly from 0.04 to 0.07 over the first
      ``warmup_teacher_temperature_epochs`` (30 in the paper), per epoch as in the reference
      (``np.linspace(0.04, 0.07, 30)[epoch]``); the student's is 0.1.

    The head's last layer is frozen (its gradients cancelled) during the first
    ``freeze_last_layer_epochs`` (the reference's ``--freeze_last_layer 1``). Every schedule is a
    function of the checkpointed step, so a resumed run continues exactly.

    Defaults are the paper's: head 2048 hidden, 256 bottleneck, 65536 outputs, 3 layers, last layer
    normalised, no BatchNorm in the head (``use_bn_in_head``: the reference's ``--use_bn_in_head``,
    BatchNorm after each hidden layer); 10 local crops (the paper's 2 x 224 + 10 x 96 multi-crop;
    the reference's default is 8). Optimizer: the paper's AdamW, lr 5e-4 x batch / 256, weight decay
    0.04, 10 warm-up epochs, cosine; the weight decay rises from 0.04 to 0.4 on a cosine
    (``optim.weight_decay_end``). The student's gradients are clipped at norm ``clip_grad`` = 3
    parameter tensor by parameter tensor, as the reference's ``clip_gradients`` does (each tensor's
    own norm, not the global one), after the cross-process reduction.

    Evaluation uses the TEACHER's backbone: ``backbone`` is the teacher's (the student's is
    ``student[0]``). The paper evaluates the teacher (Section 3.1, "Teacher network": it "has better
    performance than the student throughout the training", Figure 6 of the ablations; the
    reference's ``eval_knn.py`` and ``eval_linear.py`` load ``--checkpoint_key teacher``), unlike
    the momentum methods that evaluate their online network. The online probe reads the teacher's
    features of the first crop too; the collapse monitors read the student's backbone features of
    the global crops, and the log has the teacher's entropy and the KL divergence from teacher to
    student (their sum is the loss), whose collapse signatures the paper's ablations plot (Figure
    7): both collapses have KL 0, uniform collapse with entropy log K, one-hot collapse with entropy
    0.
    """

    name = "dino"
    views = "dino"
    default_optimizer = {"name": "adamw", "lr": 5e-4, "lr_scaling": "linear",
                         "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_epochs": 10}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 out_dim: PositiveInt = 65536, hidden_dim: PositiveInt = 2048,
                 bottleneck_dim: PositiveInt = 256, num_layers: PositiveInt = 3,
                 norm_last_layer: bool = True, use_bn_in_head: bool = False,
                 num_local_crops: NonNegativeInt = 10,
                 student_temperature: PositiveFloat = 0.1,
                 teacher_temperature: PositiveFloat = 0.07,
                 warmup_teacher_temperature: PositiveFloat = 0.04,
                 warmup_teacher_temperature_epochs: NonNegativeInt = 30,
                 center_momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9,
                 base_momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.996,
                 freeze_last_layer_epochs: NonNegativeFloat = 1.0,
                 clip_grad: NonNegativeFloat = 3.0) -> None:
        super().__init__(backbone, context)
        self.num_views = NUM_GLOBAL_CROPS + num_local_crops
        head = DINOHead(context.feature_dim, out_dim, hidden_dim, bottleneck_dim, num_layers,
                        norm_last_layer, use_bn_in_head)
        self.student = nn.Sequential(backbone, head)
        self.teacher = MomentumCopy(self.student)
        self.backbone = self.teacher.module[0]
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.warmup_teacher_temperature_epochs = warmup_teacher_temperature_epochs
        self.center_momentum = center_momentum
        self.base_momentum = base_momentum
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.clip_grad = clip_grad
        # The m of the latest momentum update (a function of progress, so not checkpointed).
        self.momentum = base_momentum

    def teacher_temperature_at(self, epoch: float) -> float:
        """tau_t in (0-based) epoch ``epoch``: the reference's
        ``linspace(warmup, final, warmup_epochs)[int(epoch)]``, then the final value."""
        epochs = self.warmup_teacher_temperature_epochs
        whole = int(epoch)
        if whole >= epochs:
            return self.teacher_temperature
        fraction = whole / (epochs - 1) if epochs > 1 else 0.0
        return (self.warmup_teacher_temperature
                + (self.teacher_temperature - self.warmup_teacher_temperature) * fraction)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``C <- m C + (1 - m) mean(g_t)``, the mean over the global crops of every process."""
        total = gather_no_grad(teacher_logits.sum(dim=0, keepdim=True)).sum(dim=0, keepdim=True)
        batch_center = total / (teacher_logits.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(
            batch_center.to(self.center.dtype), alpha=1.0 - self.center_momentum)

    def training_step(self, batch: Batch) -> StepOutput:
        batch_size = batch.views[0].shape[0]
        global_crops = torch.cat(batch.views[:NUM_GLOBAL_CROPS])
        student_backbone, student_head = self.student
        # One backbone pass per crop size (the reference's MultiCropWrapper), one head pass.
        student_features = torch.cat([student_backbone(torch.cat(group))
                                      for group in resolution_groups(batch.views)])
        student_logits = student_head(student_features).split(batch_size)
        with torch.no_grad():
            teacher_backbone, teacher_head = self.teacher.module
            teacher_features = teacher_backbone(global_crops)
            teacher_logits = teacher_head(teacher_features)
        temperature = self.teacher_temperature_at(batch.epoch)
        loss = dino(student_logits, teacher_logits.split(batch_size), self.center,
                    self.student_temperature, temperature)
        with torch.no_grad():
            log_targets = F.log_softmax((teacher_logits - self.center) / temperature, dim=-1)
            teacher_entropy = -(log_targets.exp() * log_targets).sum(dim=-1).mean()
        # After the loss: the step's targets are centred with the centre of the previous steps.
        self.update_center(teacher_logits)
        logs = {"teacher_temperature": temperature, "teacher_entropy": teacher_entropy,
                "kl": loss.detach() - teacher_entropy, "center_norm": self.center.norm(),
                "momentum": self.momentum}
        return StepOutput(loss, logs=logs, features=teacher_features[:batch_size],
                          embeddings=list(student_features[:len(global_crops)].split(batch_size)))

    def on_before_optimizer_step(self, epoch: float) -> None:
        if self.clip_grad > 0:
            clip_each_gradient(self.student.parameters(), self.clip_grad)
        if epoch < self.freeze_last_layer_epochs:
            for parameter in self.student[1].last_layer.parameters():
                parameter.grad = None

    def on_after_optimizer_step(self, progress: float) -> None:
        self.momentum = cosine_momentum(self.base_momentum, progress)
        self.teacher.update(self.student, self.momentum)
