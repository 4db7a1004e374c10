from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from selfsup.backbones import require_feature_map
from selfsup.ema import MomentumCopy, cosine_momentum
from selfsup.losses import pixpro, positive_pixel_pairs
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method

# Below this a cosine counts as 0 for s = max(cos, 0)^gamma: for gamma < 1 the gradient of
# cos^gamma is infinite at 0, and 0 * inf would be NaN; no value above it moves.
_SMALLEST_SIMILARITY = 1e-6


def pixel_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """PixPro's projection head on every pixel of a feature map: conv1x1 - BN - ReLU - conv1x1
    (Xie et al. 2021, Section 4.1). The first convolution has no bias: the BN would cancel it."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))


class PixelPropagation(nn.Module):
    """The pixel propagation module (PPM; Xie et al. 2021, Section 3.2)::

        y_i = sum_{j in Omega} s(x_i, x_j) g(x_j),    s(x_i, x_j) = max(cos(x_i, x_j), 0)^gamma

    over every pixel ``j`` of the same feature map ``Omega``. ``gamma`` (``sharpness``, 2) sharpens
    the similarity; ``g`` is ``transform_layers`` 1x1 convolutions with BatchNorm and ReLU
    between successive ones (0: the identity; the paper's best is 1, a single linear layer). The
    similarities and their sum run in float32 at least whatever the autocast, as the loss does.
    """

    def __init__(self, dim: int, transform_layers: int = 1, sharpness: float = 2.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(transform_layers - 1):
            layers += [nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim),
                       nn.ReLU(inplace=True)]
        if transform_layers > 0:
            layers.append(nn.Conv2d(dim, dim, 1))
        self.transform = nn.Sequential(*layers)
        self.sharpness = sharpness

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` pixel features ``x`` -> their propagations ``y``, same shape."""
        values = self.transform(features)
        dtype = torch.promote_types(features.dtype, torch.float32)
        with torch.autocast(features.device.type, enabled=False):
            unit = F.normalize(features.to(dtype).flatten(2), dim=1)  # (N, C, H * W)
            cosine = torch.bmm(unit.transpose(1, 2), unit)  # (N, H * W, H * W): [n, i, j]
            similarity = torch.where(cosine > _SMALLEST_SIMILARITY,
                                     cosine.clamp(min=_SMALLEST_SIMILARITY).pow(self.sharpness),
                                     0.0)
            propagated = torch.bmm(values.to(dtype).flatten(2), similarity.transpose(1, 2))
        return propagated.view(values.shape)


class DenseEncoder(nn.Module):
    """The backbone's feature map, then the pixel-wise projector: the network the momentum
    encoder copies (it shares the modules it is given)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.feature_map(images))


@register_method
class PixPro(Method):
    """PixPro (Xie, Lin, Zhang, Cao, Lin & Hu 2021, "Propagate Yourself: Exploring Pixel-Level
    Consistency for Unsupervised Visual Representation Learning", CVPR).

    Pixel-to-propagation consistency. Both views go through the online encoder (the backbone's
    last feature map, before global pooling, and a per-pixel projection head) and the pixel
    propagation module (:class:`PixelPropagation`), giving ``y``; and through the momentum
    encoder (a momentum copy of backbone + projector, no gradient), giving ``x'``. Pixels of the
    two views that lie within ``T`` feature-map bin diagonals of each other in the original image
    are positive pairs, found from the crop box (and flip) that the augmentation recorded for
    each view (``Batch.view_boxes``). The loss is ``-cos(y_i, x'_j) - cos(y_j, x'_i)`` averaged
    over each image's positive pairs, then over the batch (:func:`selfsup.losses.pixpro`). After
    every optimizer step the momentum copy moves with a momentum rising from ``base_momentum`` to
    1 on BYOL's cosine schedule.

    Defaults are the paper's (Sections 3 and 4.1): projection head conv1x1 - BN - ReLU - conv1x1
    with 2048 hidden and 256 output channels; PPM with ``gamma = 2`` and one linear layer for
    ``g``; ``T = 0.7``; momentum 0.99 -> 1; two views with BYOL's asymmetric augmentations
    (recipe ``byol``). The online backbone is the one evaluated. Two details differ from the
    authors' code (zdaxie/PixPro), which the paper's equations do not show: the code normalises
    ``g(x_j)`` before the propagation sum, and multiplies each direction of the loss by 2
    (``-2 cos``); here ``y`` and the loss are the paper's equations. The code's projection head
    is also 4096 wide where the paper states 2048.
    """

    name = "pixpro"
    views = "byol"
    uses_view_boxes = True
    # LARS, lr 1.0 x batch / 256, weight decay 1e-5, cosine decay (Section 4.1); 5 warm-up epochs
    # as in the authors' scripts (tools/pixpro_base_r50_100ep.sh).
    default_optimizer = {"name": "lars", "lr": 1.0, "lr_scaling": "linear", "weight_decay": 1e-5,
                         "warmup_epochs": 5}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt = 2048, proj_dim: PositiveInt = 256,
                 base_momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99,
                 sharpness: PositiveFloat = 2.0, transform_layers: NonNegativeInt = 1,
                 distance_threshold: PositiveFloat = 0.7) -> None:
        super().__init__(backbone, context)
        require_feature_map(backbone, "pixpro")
        self.projector = pixel_projector(context.feature_dim, proj_hidden_dim, proj_dim)
        self.propagation = PixelPropagation(proj_dim, transform_layers, sharpness)
        self.momentum_encoder = MomentumCopy(self.online_encoder())
        self.base_momentum = base_momentum
        self.distance_threshold = distance_threshold
        # The momentum of the latest update (a function of progress, so not checkpointed).
        self.momentum = base_momentum

    def online_encoder(self) -> nn.Module:
        """Backbone feature map + projector: the part of the online network the momentum copy
        follows."""
        return DenseEncoder(self.backbone, self.projector)

    def training_step(self, batch: Batch) -> StepOutput:
        if batch.view_boxes is None:
            raise ValueError("pixpro needs each view's crop box (Batch.view_boxes, from "
                             "ViewGenerator.views_and_boxes)")
        x1, x2 = batch.views
        boxes1, boxes2 = batch.view_boxes
        map1, map2 = self.backbone.feature_map(x1), self.backbone.feature_map(x2)
        z1, z2 = self.projector(map1), self.projector(map2)
        y1, y2 = self.propagation(z1), self.propagation(z2)
        with torch.no_grad():
            target1, target2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        positives = positive_pixel_pairs(boxes1, boxes2, z1.shape[-2:], z2.shape[-2:],
                                         self.distance_threshold)
        loss = pixpro(y1, y2, target1, target2, positives)
        logs = {"momentum": self.momentum,
                "positive_pairs_per_image": positives.sum(dim=(1, 2)).float().mean()}
        # The probe reads the pooled features, as the backbone's forward pools them; the collapse
        # monitors read the pooled projections, one row per image in both views.
        return StepOutput(loss, logs=logs, features=map1.mean(dim=(2, 3)),
                          embeddings=[z1.mean(dim=(2, 3)), z2.mean(dim=(2, 3))])

    def on_after_optimizer_step(self, progress: float) -> None:
        self.momentum = cosine_momentum(self.base_momentum, progress)
        self.momentum_encoder.update(self.online_encoder(), self.momentum)
