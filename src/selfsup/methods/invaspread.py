from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import nn

from selfsup.losses import invaspread
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class InvaSpread(Method):
    """Invariant and spreading instance feature, InvaSpread (Ye et al. 2019, "Unsupervised
    Embedding Learning via Invariant and Spreading Instance Feature", CVPR).

    Two augmented views of each image (the original x_i and its copy x̂_i; the authors' code
    augments both) go through one encoder and a linear head (the paper's FC 128 + L2 norm). The
    loss is the paper's in-batch softmax embedding: each copy is classified as its own instance
    against the batch's features (invariance) and every other instance is pushed away
    (spreading), gathered across processes with gradient; see :func:`selfsup.losses.invaspread`.
    Defaults: embedding 128, temperature 0.1 (Section 4).
    """

    name = "invaspread"
    # The InstDisc augmentation the paper follows (crop, jitter, grayscale, flip): MoCo v1's copy.
    views = "moco_v1"
    # SGD, lr 0.03 at batch 128 (0.06 per 256 images, linear scaling), momentum 0.9, weight
    # decay 5e-4 (Section 4.1). The paper steps the lr down at epochs 120 and 160; the generic
    # trainer's schedule is cosine.
    default_optimizer = {"name": "sgd", "lr": 0.06, "lr_scaling": "linear", "weight_decay": 5e-4,
                         "momentum": 0.9, "warmup_epochs": 0}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_dim: PositiveInt = 128, temperature: PositiveFloat = 0.1) -> None:
        super().__init__(backbone, context)
        self.projector = nn.Linear(context.feature_dim, proj_dim)
        self.temperature = temperature

    def training_step(self, batch: Batch) -> StepOutput:
        x, x_augmented = batch.views
        # One forward over both views, as the authors' code: BN sees the 2m images.
        features = self.backbone(torch.cat([x, x_augmented]))
        f, f_augmented = F.normalize(self.projector(features), dim=1).chunk(2)
        loss = invaspread(f, f_augmented, self.temperature, gather_distributed=True)
        return StepOutput(loss, features=features[: x.shape[0]], embeddings=[f, f_augmented])
