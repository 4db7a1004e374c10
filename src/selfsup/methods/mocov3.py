from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from selfsup.ema import MomentumCopy, cosine_momentum
from selfsup.errors import ConfigError
from selfsup.heads import ProjectionMLP
from selfsup.losses import info_nce
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method

# The reference's temperatures (facebookresearch/moco-v3, CONFIG.md): --moco-t=.2 in every ViT
# command, the default 1.0 for ResNets.
VIT_TEMPERATURE = 0.2
RESNET_TEMPERATURE = 1.0


def patch_projection(backbone: nn.Module) -> nn.Module | None:
    """The patch projection (the first layer) of a ViT backbone, None for other networks: the
    ``conv_proj`` of torchvision's (and selfsup's) ViT, the ``patch_embed.proj`` of timm's."""
    if isinstance(backbone, VisionTransformer):
        return backbone.conv_proj
    patch_embed = getattr(backbone, "patch_embed", None)
    return getattr(patch_embed, "proj", None)


@register_method
class MoCoV3(Method):
    """MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
    Transformers", ICCV), for ViT or ResNet backbones.

    Two views, each encoded by the online network (backbone, projector, predictor) into queries
    q1, q2 and by the momentum network (a momentum copy of backbone + projector, no gradient) into
    keys k1, k2. The loss is Algorithm 1's symmetric ``ctr(q1, k2) + ctr(q2, k1)``, where
    ``ctr(q, k) = 2 tau CE(q k^T / tau, i)`` scores each query against the keys of the whole batch
    (gathered from every process): the positive is its own image's key, and there is no queue.
    After every step the momentum network moves as ``theta_k <- m theta_k + (1 - m) theta_q`` with
    m rising from 0.99 to 1 on a half-cycle cosine (the reference's ``--moco-m-cos``).

    Heads (the paper's appendix, "MLP heads", and the reference ``moco/builder.py``): a 3-layer
    projector and a 2-layer predictor, 4096 hidden units, 256 outputs, BN on every layer with the
    output BN without affine parameters, linear layers without bias (the reference's ResNet
    variant uses a 2-layer projector: ``proj_layers=2``).

    Backbone-dependent settings, ``None`` meaning the paper's value for the backbone at hand:
    ``temperature`` 0.2 for a ViT, 1.0 for a ResNet (the reference's commands), and
    ``freeze_patch_embed`` (Section 4.2, "random patch projection": the ViT's patch projection
    keeps its random initialisation and gets no gradient, which the paper finds makes training
    stable; the reference's ``--stop-grad-conv1``) on for a ViT; it is an error for a network
    without a patch projection.

    Optimizer: the reference's default (ResNet) LARS, lr 0.6 x batch / 256, weight decay 1e-6,
    10 warm-up epochs, cosine. For a ViT the paper uses AdamW, lr 1.5e-4 x batch / 256, weight
    decay 0.1, 40 warm-up epochs (set them in the config). Views: BYOL's asymmetric pair, as the
    paper. The online backbone is the one evaluated, as in the paper.
    """

    name = "mocov3"
    views = "byol"
    default_optimizer = {"name": "lars", "lr": 0.6, "lr_scaling": "linear",
                         "weight_decay": 1e-6, "warmup_epochs": 10}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt = 4096, proj_dim: PositiveInt = 256,
                 proj_layers: Annotated[int, Field(ge=2)] = 3,
                 pred_hidden_dim: PositiveInt = 4096,
                 base_momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99,
                 temperature: PositiveFloat | None = None,
                 freeze_patch_embed: bool | None = None) -> None:
        super().__init__(backbone, context)
        projection = patch_projection(backbone)
        is_vit = projection is not None
        if freeze_patch_embed and not is_vit:
            raise ConfigError("method_args.freeze_patch_embed=true needs a ViT backbone "
                              f"(got {type(backbone).__name__}, which has no patch projection)")
        if temperature is None:
            temperature = VIT_TEMPERATURE if is_vit else RESNET_TEMPERATURE
        self.temperature = temperature
        self.freeze_patch_embed = is_vit if freeze_patch_embed is None else freeze_patch_embed
        if self.freeze_patch_embed:
            projection.requires_grad_(False)
        self.projector = ProjectionMLP(context.feature_dim, proj_hidden_dim, proj_dim,
                                       num_layers=proj_layers, output_batch_norm=True)
        self.predictor = ProjectionMLP(proj_dim, pred_hidden_dim, proj_dim,
                                       output_batch_norm=True)
        self.momentum_encoder = MomentumCopy(self.online_encoder())
        self.base_momentum = base_momentum
        # The m of the latest momentum update (a function of progress, so not checkpointed).
        self.momentum = base_momentum

    def online_encoder(self) -> nn.Module:
        """Backbone + projector: the part of the online network the momentum network copies."""
        return nn.Sequential(self.backbone, self.projector)

    def contrastive_loss(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The reference's ``ctr``: 2 tau x cross-entropy of q k^T / tau over the keys of every
        process (its own key the positive). The 2 tau factor cancels the 1/tau scale of the
        gradient, so the learning rate need not move with the temperature."""
        return 2 * self.temperature * info_nce(query, key, temperature=self.temperature,
                                               gather_distributed=True)

    def training_step(self, batch: Batch) -> StepOutput:
        x1, x2 = batch.views
        features = self.backbone(x1)
        z1 = self.projector(features)
        z2 = self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        return StepOutput(loss, logs={"momentum": self.momentum}, features=features,
                          embeddings=[z1, z2])

    def on_after_optimizer_step(self, progress: float) -> None:
        self.momentum = cosine_momentum(self.base_momentum, progress)
        self.momentum_encoder.update(self.online_encoder(), self.momentum)
