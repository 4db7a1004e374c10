from __future__ import annotations

import torch
from pydantic import PositiveFloat, PositiveInt
from torch import nn

from selfsup.heads import ProjectionMLP
from selfsup.losses import nt_xent
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class SimCLR(Method):
    """SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML).

    Two views of each image go through one encoder and a projection head g(h) = W2 ReLU(BN(W1 h));
    NT-Xent pulls the pair together against the other 2N - 2 views of the global batch (gathered
    across processes with their gradient). Defaults: the paper's head (hidden = feature dim,
    output 128) and its CIFAR-10 temperature 0.5.
    """

    name = "simclr"
    views = "simclr"
    # LARS, lr = 0.3 x batch / 256, weight decay 1e-6, 10 warm-up epochs (Section B.1 / B.9).
    default_optimizer = {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-6,
                         "warmup_epochs": 10}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt | None = None, proj_dim: PositiveInt = 128,
                 temperature: PositiveFloat = 0.5) -> None:
        super().__init__(backbone, context)
        hidden = proj_hidden_dim or context.feature_dim
        self.projector = self.build_projector(context.feature_dim, hidden, proj_dim)
        self.temperature = temperature

    @staticmethod
    def build_projector(feature_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
        return ProjectionMLP(feature_dim, hidden_dim, out_dim, batch_norm=True)

    def training_step(self, batch: Batch) -> StepOutput:
        x1, x2 = batch.views
        # One forward over both views, as the paper's implementation does: BN sees all 2N views.
        features = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projector(features).chunk(2)
        loss = nt_xent(z1, z2, self.temperature, gather_distributed=True)
        return StepOutput(loss, features=features[: x1.shape[0]], embeddings=[z1, z2])
