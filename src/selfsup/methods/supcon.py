from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import nn

from selfsup.heads import ProjectionMLP
from selfsup.losses import supcon
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class SupCon(Method):
    """Supervised contrastive learning, SupCon (Khosla et al. 2020, "Supervised Contrastive
    Learning", NeurIPS).

    ``num_views`` views of each image go through one encoder and a projection MLP
    (Linear-ReLU-Linear, hidden = feature dim, output 128, as the SupContrast reference); the
    L2-normalised projections of the global batch (gathered across processes with their gradient)
    enter the SupCon loss (L_out), where every view of the same class is a positive.

    Unlabelled samples (label < 0) are their own class: their positives are only their own other
    views, so they contribute SimCLR's term; with no labels at all the loss is SimCLR's NT-Xent.
    Defaults: temperature 0.1 (the paper's and the reference's CIFAR command); ``base_temperature``
    (0.07 in the reference) rescales the loss by temperature / base_temperature when set.

    The two-stage recipe of the paper is ``selfsup train --method supcon``: pretraining, then the
    trainer's linear classifier on the frozen backbone (``eval.after_training: [linear]``). Its
    cross-entropy baseline at the same budget is the ``supervised`` method.
    """

    name = "supcon"
    views = "supcon"
    # The reference's CIFAR setting (SupContrast README): SGD, lr 0.5 at batch 1024 (0.125 per
    # 256 images, linear scaling), momentum 0.9, weight decay 1e-4, cosine, 10 warm-up epochs
    # (the reference warms up whenever the batch exceeds 256). The paper used LARS on ImageNet.
    default_optimizer = {"name": "sgd", "lr": 0.125, "lr_scaling": "linear", "weight_decay": 1e-4,
                         "momentum": 0.9, "warmup_epochs": 10}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 num_views: PositiveInt = 2, proj_hidden_dim: PositiveInt | None = None,
                 proj_dim: PositiveInt = 128, temperature: PositiveFloat = 0.1,
                 base_temperature: PositiveFloat | None = None) -> None:
        super().__init__(backbone, context)
        # An instance attribute over the class default: the trainer reads it to build the views.
        self.num_views = num_views
        hidden = proj_hidden_dim or context.feature_dim
        self.projector = ProjectionMLP(context.feature_dim, hidden, proj_dim, batch_norm=False)
        self.temperature = temperature
        self.base_temperature = base_temperature

    @staticmethod
    def class_labels(batch: Batch) -> torch.Tensor | None:
        """The labels the loss compares: unlabelled samples (label < 0) get a class of their own,
        -1 - sample index, unique across processes and disjoint from the real classes."""
        if batch.labels is None:
            return None
        return torch.where(batch.labels >= 0, batch.labels, -1 - batch.index.to(batch.labels))

    def training_step(self, batch: Batch) -> StepOutput:
        size = batch.views[0].shape[0]
        # One forward over every view, as the reference does: BN sees the whole multi-view batch.
        features = self.backbone(torch.cat(batch.views))
        projections = F.normalize(self.projector(features), dim=1).split(size)
        loss = supcon(torch.stack(projections, dim=1), self.class_labels(batch), self.temperature,
                      self.base_temperature, gather_distributed=True)
        return StepOutput(loss, features=features[:size], embeddings=list(projections))
