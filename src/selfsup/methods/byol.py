from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import nn

from selfsup.ema import MomentumCopy, cosine_momentum
from selfsup.heads import ProjectionMLP
from selfsup.losses import normalized_mse
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class BYOL(Method):
    """BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
    Learning", NeurIPS).

    The online network (backbone, projector, predictor) predicts the target network's projection
    of the other view; the target is a momentum copy of backbone + projector and gets no gradient.
    The loss is the normalised squared error 2 - 2 cos(q, z') of eq. 2, summed over both
    directions (view 1 -> view 2 and view 2 -> view 1), averaged over the batch. After every
    optimizer step the target moves as xi <- tau xi + (1 - tau) theta, with tau rising from
    ``base_momentum`` to 1 on BYOL's cosine schedule, tau = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2.

    Defaults are the paper's: projector and predictor MLPs of 4096 hidden units with BN and 256
    outputs; tau_base = 0.99 for CIFAR (the issue's setting; the paper's ImageNet value is 0.996).
    Views: the asymmetric ``byol`` recipe. Each view is its own forward pass, as in the reference
    code, so BatchNorm statistics are per view. The online backbone is the one evaluated, as in the
    paper (the target is a training device only).
    """

    name = "byol"
    views = "byol"
    # LARS, lr = 0.2 x batch / 256, weight decay 1.5e-6, biases and BN excluded, 10 warm-up
    # epochs, cosine decay (Appendix C).
    default_optimizer = {"name": "lars", "lr": 0.2, "lr_scaling": "linear",
                         "weight_decay": 1.5e-6, "warmup_epochs": 10}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt = 4096, proj_dim: PositiveInt = 256,
                 pred_hidden_dim: PositiveInt = 4096,
                 base_momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99) -> None:
        super().__init__(backbone, context)
        self.projector = ProjectionMLP(context.feature_dim, proj_hidden_dim, proj_dim)
        self.predictor = ProjectionMLP(proj_dim, pred_hidden_dim, proj_dim)
        self.momentum_encoder = MomentumCopy(self.online_encoder())
        self.base_momentum = base_momentum
        # The tau of the latest target update (a function of progress, so not checkpointed).
        self.momentum = base_momentum

    def online_encoder(self) -> nn.Module:
        """Backbone + projector: the part of the online network the target copies."""
        return nn.Sequential(self.backbone, self.projector)

    def training_step(self, batch: Batch) -> StepOutput:
        x1, x2 = batch.views
        features = self.backbone(x1)
        z1 = self.projector(features)
        z2 = self.projector(self.backbone(x2))
        with torch.no_grad():
            target1, target2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        loss = (normalized_mse(self.predictor(z1), target2)
                + normalized_mse(self.predictor(z2), target1))
        return StepOutput(loss, logs={"momentum": self.momentum}, features=features,
                          embeddings=[z1, z2])

    def on_after_optimizer_step(self, progress: float) -> None:
        self.momentum = cosine_momentum(self.base_momentum, progress)
        self.momentum_encoder.update(self.online_encoder(), self.momentum)
