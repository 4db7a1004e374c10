from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from selfsup.distributed import (convert_to_split_batchnorm, gather_no_grad,
                                 shuffle_across_processes, unshuffle_across_processes)
from selfsup.ema import MomentumCopy
from selfsup.heads import ProjectionMLP
from selfsup.losses import info_nce
from selfsup.memory import Queue
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class MoCoV2(Method):
    """MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning", CVPR; Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

    Queries come from the online encoder, keys from its momentum copy (no gradient). InfoNCE scores
    each query against its key and a queue of K past keys; the keys of the step are enqueued after
    the negatives are read. Defaults: the CIFAR settings of the issue and the MoCo authors' CIFAR
    demo — K = 4096, m = 0.99, T = 0.2, MLP head (hidden = feature dim, output 128, no BN); use
    K = 65536, m = 0.999 for ImageNet.

    Shuffle-BN: keys are computed on a batch shuffled across processes; with
    ``bn_splits > 1`` every BatchNorm of both encoders also normalises over that many
    sub-batches, which is what makes the shuffle effective on a single device (see
    ``SplitBatchNorm2d``). ``bn_splits=1`` gives plain BN (and true cross-GPU shuffle-BN under DDP).
    The online backbone is the one evaluated.
    """

    name = "mocov2"
    views = "moco_v2"
    # SGD, lr 0.03 per 256 images, momentum 0.9, weight decay 1e-4, cosine, no warm-up (MoCo v2).
    default_optimizer = {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "weight_decay": 1e-4,
                         "momentum": 0.9, "warmup_epochs": 0}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt | None = None, proj_dim: PositiveInt = 128,
                 queue_size: PositiveInt = 4096,
                 momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99,
                 temperature: PositiveFloat = 0.2, bn_splits: PositiveInt = 8) -> None:
        super().__init__(backbone, context)
        if bn_splits > 1:
            convert_to_split_batchnorm(self.backbone, bn_splits)
        hidden = proj_hidden_dim or context.feature_dim
        self.projector = self.build_projector(context.feature_dim, hidden, proj_dim)
        self.momentum_encoder = MomentumCopy(nn.Sequential(self.backbone, self.projector))
        self.queue = Queue(queue_size, proj_dim)
        self.momentum = momentum
        self.temperature = temperature

    @staticmethod
    def build_projector(feature_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
        return ProjectionMLP(feature_dim, hidden_dim, out_dim, batch_norm=False)

    def training_step(self, batch: Batch) -> StepOutput:
        x_query, x_key = batch.views
        features = self.backbone(x_query)
        query = F.normalize(self.projector(features), dim=1)
        with torch.no_grad():
            shuffled, unshuffle = shuffle_across_processes(x_key, batch.generator)
            key = F.normalize(self.momentum_encoder(shuffled), dim=1)
            key = unshuffle_across_processes(key, unshuffle)
        loss = info_nce(query, key, negative_keys=self.queue.snapshot(),
                        temperature=self.temperature)
        self.queue.push(gather_no_grad(key))
        return StepOutput(loss, features=features, embeddings=[query, key])

    def on_after_optimizer_step(self, progress: float) -> None:
        self.momentum_encoder.update(nn.Sequential(self.backbone, self.projector), self.momentum)
