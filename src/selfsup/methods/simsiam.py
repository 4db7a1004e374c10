from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveInt
from torch import nn

from selfsup.heads import ProjectionMLP
from selfsup.losses import negative_cosine
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class SimSiam(Method):
    """SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning", CVPR).

    One encoder f (backbone + projection MLP) embeds both views; a prediction MLP h maps each
    embedding onto the other view's, whose gradient is stopped:

        L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)),   D = negative cosine (eq. 1-2).

    The stop-gradient is what prevents collapse (Section 4.1); ``stop_gradient=False`` removes it,
    for the collapse experiment. The predictor keeps a fixed learning rate (Section 4.1, Table 1).

    Heads as in the reference code: projection MLP Linear-BN-ReLU (x num_layers - 1) then
    Linear-BN (no ReLU, BN without affine on the output); predictor a bottleneck
    Linear(2048, 512)-BN-ReLU-Linear(512, 2048). Defaults are the paper's CIFAR-10 setting
    (Appendix D): a 2-layer projection MLP with 2048-d hidden and output layers (ImageNet:
    ``proj_layers=3``). Views: ``moco_v2``, the paper's augmentations (same as MoCo v2: crop
    (0.2, 1), jitter, grayscale, blur from 96 px on, flip). Each view is its own forward pass, as in
    the reference code.
    """

    name = "simsiam"
    views = "moco_v2"
    # The CIFAR-10 setting of Appendix D: SGD, lr 0.03 x batch / 256, momentum 0.9, weight decay
    # 5e-4, cosine, no warm-up. (ImageNet, Section 4: lr 0.05 x batch / 256, weight decay 1e-4.)
    default_optimizer = {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "weight_decay": 5e-4,
                         "momentum": 0.9, "warmup_epochs": 0}
    fixed_lr_modules = ("predictor",)

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt = 2048, proj_dim: PositiveInt = 2048,
                 proj_layers: Annotated[int, Field(ge=2)] = 2,
                 pred_hidden_dim: PositiveInt = 512, stop_gradient: bool = True) -> None:
        super().__init__(backbone, context)
        self.projector = nn.Sequential(
            ProjectionMLP(context.feature_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers),
            nn.BatchNorm1d(proj_dim, affine=False))
        self.predictor = ProjectionMLP(proj_dim, pred_hidden_dim, proj_dim)
        self.stop_gradient = stop_gradient

    def training_step(self, batch: Batch) -> StepOutput:
        x1, x2 = batch.views
        features = self.backbone(x1)
        z1 = self.projector(features)
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        target1, target2 = (z1.detach(), z2.detach()) if self.stop_gradient else (z1, z2)
        loss = 0.5 * negative_cosine(p1, target2) + 0.5 * negative_cosine(p2, target1)
        return StepOutput(loss, features=features, embeddings=[z1, z2])
