from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from selfsup.methods.base import MethodContext, register_method
from selfsup.methods.mocov2 import MoCoV2


@register_method
class MoCoV1(MoCoV2):
    """MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning", CVPR).

    MoCo v2's training step (queue, momentum encoder, shuffle-BN) with v1's parts: a linear head
    (feature dim -> 128; v1 replaced the classifier by a 128-d fc layer), temperature 0.07,
    momentum 0.999 and the v1 augmentation (no blur, jitter on every image). K = 4096 for CIFAR;
    the paper's ImageNet queue is K = 65536. The online backbone is the one evaluated.
    """

    name = "mocov1"
    views = "moco_v1"
    # SGD, lr 0.03 per 256 images, momentum 0.9, weight decay 1e-4 (Section 4.1), inherited from
    # MoCo v2. The paper divides the lr by 10 at epochs 120 and 160 of 200; the generic trainer's
    # schedule is warm-up + cosine, which MoCo v2 showed to be at least as good.

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_dim: PositiveInt = 128, queue_size: PositiveInt = 4096,
                 momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.999,
                 temperature: PositiveFloat = 0.07, bn_splits: PositiveInt = 8) -> None:
        super().__init__(backbone, context, proj_hidden_dim=None, proj_dim=proj_dim,
                         queue_size=queue_size, momentum=momentum, temperature=temperature,
                         bn_splits=bn_splits)

    @staticmethod
    def build_projector(feature_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
        return nn.Linear(feature_dim, out_dim)
