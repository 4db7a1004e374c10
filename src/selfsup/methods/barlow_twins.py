from __future__ import annotations

from pydantic import PositiveFloat, PositiveInt
from torch import nn

from selfsup.heads import ProjectionMLP
from selfsup.losses import barlow_twins
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class BarlowTwins(Method):
    """Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML).

    One encoder (backbone + projector) embeds both views; the loss drives the cross-correlation
    of the batch-standardised embeddings towards the identity (see
    :func:`selfsup.losses.barlow_twins`), over the global batch: embeddings are gathered across
    processes with their gradient, so the loss does not depend on how the batch is split.

    Defaults are the paper's: a projector of 3 linear layers of 8192 units, BN + ReLU between them,
    lambda = 5e-3. 8192 is heavy for a CIFAR ResNet-18 on CPU; ``proj_hidden_dim`` and
    ``proj_dim`` set the widths (the CIFAR-10 config uses 2048). The projector's last bias, kept by
    ``ProjectionMLP``, has no effect: the loss standardises every dimension. Views: the ``byol``
    pair (the paper's augmentations are BYOL's, asymmetric blur and solarization included). Each
    view is its own forward pass, as in the reference code.
    """

    name = "barlow_twins"
    views = "byol"
    # LARS, lr = 0.2 x batch / 256 (the paper's rate for weights; it gives biases and BN 0.0048,
    # which this one-rate optimizer does not), weight decay 1.5e-6, 10 warm-up epochs, cosine.
    default_optimizer = {"name": "lars", "lr": 0.2, "lr_scaling": "linear",
                         "weight_decay": 1.5e-6, "warmup_epochs": 10}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt = 8192, proj_dim: PositiveInt = 8192,
                 lambd: PositiveFloat = 5e-3) -> None:
        super().__init__(backbone, context)
        self.projector = ProjectionMLP(context.feature_dim, proj_hidden_dim, proj_dim,
                                       num_layers=3)
        self.lambd = lambd

    def training_step(self, batch: Batch) -> StepOutput:
        x1, x2 = batch.views
        features = self.backbone(x1)
        z1 = self.projector(features)
        z2 = self.projector(self.backbone(x2))
        loss = barlow_twins(z1, z2, self.lambd, gather_distributed=True)
        return StepOutput(loss, features=features, embeddings=[z1, z2])
