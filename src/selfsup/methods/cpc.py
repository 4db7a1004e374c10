from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from selfsup.augment.ops import ColorDrop, HorizontalFlip, Pipeline
from selfsup.distributed import gather_with_grad, rank
from selfsup.errors import ConfigError
from selfsup.losses import info_nce
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# Quarter turns of the latent grid per number of prediction directions: top-down; and bottom-up;
# and the two horizontal ones (Hénaff et al. 2020, Section 4.1).
_TURNS = {1: (0,), 2: (0, 2), 4: (0, 1, 2, 3)}


def extract_patches(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Cut ``(B, C, H, W)`` images into their grid of overlapping patches,
    ``(B, rows, cols, C, patch_size, patch_size)``: patch ``(i, j)`` is
    ``images[..., i*stride : i*stride + patch_size, j*stride : j*stride + patch_size]``, and
    ``rows = (H - patch_size) // stride + 1`` (pixels past the last whole patch are left out)."""
    if patch_size > min(images.shape[-2:]):
        raise ConfigError(f"method_args.patch_size={patch_size} is larger than the images "
                          f"({images.shape[-2]}x{images.shape[-1]})")
    patches = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)
    return patches.permute(0, 2, 3, 1, 4, 5)


def grid_side(image_size: int, patch_size: int, stride: int) -> int:
    """Patches along one side of an ``image_size`` image."""
    return (image_size - patch_size) // stride + 1


def per_sample_normalization(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by a layer norm over (channels, height, width)
    of each sample (``GroupNorm`` with one group: one mean and variance per sample, the affine
    per channel), keeping the affine weights.

    CPC v2 (Hénaff et al. 2020, Section 4.1, "Layer normalization") replaces batch norm by layer
    norm in the patch encoder: batch statistics mix the patches of an image, so they leak
    information from the patches the context must not see, and the network can solve the task
    through them instead of learning features. Any other batch norm (1-d, 3-d, synchronised) is
    an error rather than a silent leak.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = nn.GroupNorm(1, child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                    norm.bias.copy_(child.bias)
            setattr(module, name, norm)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"cpc needs per-sample normalisation in the backbone, but it has "
                              f"{type(child).__name__} at {name!r}, which mixes the patches of "
                              f"a batch (backbone.name: choose a network with BatchNorm2d or "
                              f"LayerNorm)")
        else:
            per_sample_normalization(child)
    return module


class PatchGridEncoder(nn.Module):
    """The network CPC evaluates: the image cut into its grid of overlapping patches, the encoder
    applied to every patch, the patch features mean-pooled into one vector per image (Hénaff et al.
    2020, Section 3.2: the linear classifier reads the spatially mean-pooled encoder features)."""

    def __init__(self, encoder: nn.Module, patch_size: int, stride: int) -> None:
        super().__init__()
        self.encoder = per_sample_normalization(encoder)
        self.patch_size = patch_size
        self.stride = stride

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, rows, cols, C, p, p)``, see :func:`extract_patches`."""
        return extract_patches(images, self.patch_size, self.stride)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """The latent grid ``(B, D, rows, cols)`` of a patch grid ``(B, rows, cols, C, p, p)``:
        every patch encoded on its own (one batch of ``B * rows * cols`` patches)."""
        batch, rows, cols = patches.shape[:3]
        features = self.encoder(patches.reshape(batch * rows * cols, *patches.shape[3:]))
        return features.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.patches(images)).mean(dim=(2, 3))


class MaskedResidualBlock(nn.Module):
    """One residual block of CPC's PixelCNN-style context network (Hénaff et al. 2020, Appendix,
    the pseudo-code of ``pixelCNN``): 1x1 conv -> ReLU -> 1x3 conv along the row -> a 2x1 conv
    over the row above and the row itself (the grid padded by one row on top, so no output row
    sees a row below it) -> ReLU -> 1x1 conv back to the input width, added to the input.

    Together the 1x3 and 2x1 convolutions are a 2x3 convolution masked to the current and the
    previous row: output row ``i`` depends on input rows ``i - 1`` and ``i`` only.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.along_row = nn.Conv2d(hidden, hidden, kernel_size=(1, 3), padding=(0, 1))
        self.from_above = nn.Conv2d(hidden, hidden, kernel_size=(2, 1))
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.along_row(F.relu(self.reduce(x)))
        # One row of zeros on top (and none below): row i of the output sees rows i - 1 and i.
        h = F.relu(self.from_above(F.pad(h, (0, 0, 1, 0))))
        return x + self.expand(h)


class ContextNetwork(nn.Module):
    """The masked, autoregressive context network ``g_ar``: a stack of
    :class:`MaskedResidualBlock` s and a final ReLU. The context ``c_{i,j}`` sees only the latents
    of rows ``<= i`` (each block reaches one row further up)."""

    def __init__(self, channels: int, hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[MaskedResidualBlock(channels, hidden)
                                      for _ in range(num_blocks)])

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(latents))


@register_method
class CPC(Method):
    """CPC v2 (Hénaff, Srinivas, De Fauw, Razavi, Doersch, Eslami & van den Oord 2020,
    "Data-Efficient Image Recognition with Contrastive Predictive Coding", ICML), after CPC
    (van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive
    Coding").

    Each image is cut into a grid of overlapping patches ``x_{i,j}``; the encoder ``f`` (the
    configured backbone, its batch norms turned into per-sample layer norms) maps every patch to
    ``z_{i,j}``; a masked convolutional context network gives ``c_{i,j}``, which sees rows ``<= i``
    only; for each prediction step ``k`` a linear map ``W_k`` predicts the target of the patch
    ``k`` rows below, ``ẑ_{i+k,j} = W_k c_{i,j}``, and InfoNCE (the paper's eq. 2) picks the true
    target among all the patches of the batch (every position of every image; with
    ``gather_distributed`` those of every process too)::

        L = - sum_{i,j,k} log  exp(ẑ_{i+k,j}^T t_{i+k,j}) / sum_l exp(ẑ_{i+k,j}^T t_l)

    Following the appendix's pseudo-code, targets ``t = U z`` are a linear map of the latents to
    ``target_dim`` (64), predictions are scaled by ``emb_scale`` (0.1, no other temperature, no
    normalisation), the context network has 5 residual blocks 256 wide, and only step ``k = 3``
    is predicted (``steps_to_ignore = 2`` nearer rows skipped: with patches overlapping by half,
    the rows just below share pixels or an edge with the context). The loss of a step is the mean
    over its queries; steps are summed, directions averaged. CPC v2 predicts in four directions
    (Section 4.1, "bottom-up" and "horizontal" predictions): ``directions = 4`` runs the task on
    the latent grid rotated by 0, 90, 180 and 270 degrees, each direction with its own context
    network and predictions (``2``: top-down and bottom-up; ``1``: top-down only, as CPC v1).

    Augmentation: recipe ``cpc`` on the whole image (a random crop and a flip), then per patch a
    horizontal flip (``patch_flip_p``) and CPC v2's colour dropping (``patch_color_drop_p``: two of
    the three channels set to the mean), drawn with the batched ops of ``selfsup.augment``.

    Patches: the paper cuts 64-px patches with stride 32 (224-px crops, a 6x6 grid; 256 px and
    7x7 in CPC v1). The defaults here are the CIFAR scale of the same geometry: 8-px patches with
    stride 4 on 32-px images, a 7x7 grid. Evaluation uses ``backbone``: the patch grid of the image
    through the encoder, mean-pooled (:class:`PatchGridEncoder`), as the paper's linear
    classification does; probe it linearly.
    """

    name = "cpc"
    views = "cpc"
    num_views = 1
    # Adam as CPC trains (van den Oord et al. 2018 use lr 2e-4); not scaled with the batch, no
    # weight decay.
    default_optimizer = {"name": "adamw", "lr": 2e-4, "lr_scaling": "none", "weight_decay": 0.0}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 patch_size: PositiveInt = 8, patch_stride: PositiveInt = 4,
                 target_dim: PositiveInt = 64, context_dim: PositiveInt = 256,
                 context_blocks: PositiveInt = 5, steps_to_predict: PositiveInt = 3,
                 steps_to_ignore: NonNegativeInt = 2, emb_scale: PositiveFloat = 0.1,
                 directions: Literal[1, 2, 4] = 4, patch_flip_p: Probability = 0.5,
                 patch_color_drop_p: Probability = 1.0, gather_distributed: bool = False) -> None:
        side = grid_side(context.image_size, patch_size, patch_stride)
        if patch_size > context.image_size:
            raise ConfigError(f"method_args.patch_size={patch_size} is larger than the images "
                              f"(data.image_size={context.image_size})")
        if steps_to_ignore >= steps_to_predict:
            raise ConfigError(f"method_args.steps_to_ignore={steps_to_ignore} must be smaller "
                              f"than method_args.steps_to_predict={steps_to_predict}: no step "
                              f"would be predicted")
        if steps_to_predict >= side:
            raise ConfigError(f"method_args.steps_to_predict={steps_to_predict} must be smaller "
                              f"than the grid's {side} rows ({context.image_size}-px images, "
                              f"patch_size {patch_size}, patch_stride {patch_stride})")
        super().__init__(PatchGridEncoder(backbone, patch_size, patch_stride), context)
        self.steps = list(range(steps_to_ignore + 1, steps_to_predict + 1))
        self.emb_scale = emb_scale
        self.gather_distributed = gather_distributed
        dim = context.feature_dim
        self.target = nn.Conv2d(dim, target_dim, kernel_size=1)
        self.turns = _TURNS[directions]
        self.context_networks = nn.ModuleList(
            [ContextNetwork(dim, context_dim, context_blocks) for _ in self.turns])
        # predictors[d][s]: W_k of direction d for the s-th predicted step.
        self.predictors = nn.ModuleList(
            [nn.ModuleList([nn.Conv2d(dim, target_dim, kernel_size=1) for _ in self.steps])
             for _ in self.turns])
        self.patch_augment = Pipeline([HorizontalFlip(p=patch_flip_p),
                                       ColorDrop(p=patch_color_drop_p)])

    def cpc_loss(self, latents: torch.Tensor) -> torch.Tensor:
        """The CPC objective of a latent grid ``(B, D, rows, cols)``."""
        batch, _, rows, cols = latents.shape
        targets = self.target(latents)
        keys = targets.permute(0, 2, 3, 1).reshape(batch * rows * cols, -1)
        # Where each position's target sits among the keys (row-major over the batch's grids).
        index = torch.arange(keys.shape[0], device=latents.device).view(batch, rows, cols)
        if self.gather_distributed:
            index = index + rank() * keys.shape[0]
            keys = gather_with_grad(keys)
        direction_losses = []
        for turn, network, predictors in zip(self.turns, self.context_networks,
                                             self.predictors):
            # Rotating the grid turns "rows below" into the other directions.
            grid = torch.rot90(latents, turn, dims=(2, 3))
            grid_index = torch.rot90(index, turn, dims=(1, 2))
            context = network(grid)
            height = grid.shape[2]
            loss = latents.new_zeros(())
            for k, predictor in zip(self.steps, predictors):
                predictions = predictor(context[:, :, : height - k]) * self.emb_scale
                queries = predictions.permute(0, 2, 3, 1).reshape(-1, predictions.shape[1])
                positive = grid_index[:, k:].reshape(-1)
                loss = loss + info_nce(queries, keys[positive], keys, temperature=1.0,
                                       normalize=False, positive_index=positive)
            direction_losses.append(loss)
        return torch.stack(direction_losses).mean()

    def training_step(self, batch: Batch) -> StepOutput:
        (images,) = batch.views
        patches = self.backbone.patches(images)
        grid_shape = patches.shape[:3]
        flat = self.patch_augment(patches.reshape(-1, *patches.shape[3:]), batch.generator)
        latents = self.backbone.encode(flat.reshape(*grid_shape, *flat.shape[1:]))
        loss = self.cpc_loss(latents)
        pooled = latents.mean(dim=(2, 3))
        return StepOutput(loss, features=pooled, embeddings=[pooled])
