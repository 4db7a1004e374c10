"""Encoders: ``build_backbone(name) -> (module, feature_dim)``.

ResNets are assembled from torchvision's own ``BasicBlock``/``Bottleneck`` with the attribute
names of ``torchvision.models.ResNet`` (so torchvision state dicts load at width 1), plus the two
things SSL papers change:

- the CIFAR stem (SimCLR, Chen et al. 2020, Appendix B.9): a 3x3 stride-1 first conv and no max-pool,
  so 32x32 images keep their resolution into ``layer1``;
- a width multiplier, so the same architecture runs at CPU-demo and unit-test sizes.

``ResNet.feature_map(x)`` gives the last stage's map before global pooling, for dense methods.

Vision Transformers (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") are torchvision's
``VisionTransformer`` in the sizes of DeiT (Touvron et al. 2021) that MoCo v3 and DINO train:
``vit_tiny`` (192 wide, 3 heads), ``vit_small`` (384, 6 heads; ViT-S/16 has 21.7M parameters) and
``vit_base`` (768, 12 heads), all 12 blocks with MLP ratio 4. Patches are 16 px for 224-px images,
and 4 px with ``cifar_stem`` (32-px images, so 64 patches: the small-patch CIFAR ViT). The features
are the CLS token after the final LayerNorm, as MoCo v3 and DINO evaluate. ``width`` scales the
width per head (heads are kept).

Any other name is handed to timm (``timm.create_model(name, num_classes=0)``) when timm is
installed, so every timm model is a backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vision_transformer
from torchvision.models.resnet import BasicBlock, Bottleneck

from selfsup.errors import ConfigError

_RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNet(nn.Module):
    """A torchvision-compatible ResNet trunk without the classifier; returns pooled features."""

    def __init__(self, block: type[nn.Module], layers: list[int], width: float = 1.0,
                 cifar_stem: bool = False, in_channels: int = 3) -> None:
        super().__init__()
        widths = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1,
                                   bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3] * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int
                    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output before global pooling, ``(B, feature_dim, H / 32, W / 32)``
        (``H / 8`` with the CIFAR stem): the dense features that pixel-level methods compare."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = _run_stage(stage, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)


def _run_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)``, in float32 when bf16 autocast on the CPU meets a 1x1 feature map.

    The CPU's bf16 weight gradient of a 3x3, stride-2 convolution of a 1x1 input (torch 2.14,
    oneDNN) is garbage: NaN or 1e11 times too large, differently from run to run. A ResNet meets
    it where a stage starts at 1x1 (the ImageNet stem on 16-px crops, e.g. DINO's local crops of
    32-px images); on a 1x1 map float32 costs next to nothing.
    """
    if x.device.type == "cpu" and x.shape[-2:] == (1, 1) and _cpu_autocast_enabled():
        with torch.autocast("cpu", enabled=False):
            return stage(x.float())
    return stage(x)


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


def _build_resnet(name: str, cifar_stem: bool, width: float, in_channels: int
                  ) -> tuple[nn.Module, int]:
    block, layers = _RESNETS[name]
    model = ResNet(block, layers, width=width, cifar_stem=cifar_stem, in_channels=in_channels)
    return model, model.feature_dim


# name: (heads, width per head); every size has 12 blocks and an MLP 4 times as wide.
_VITS: dict[str, tuple[int, int]] = {
    "vit_tiny": (3, 64),
    "vit_small": (6, 64),
    "vit_base": (12, 64),
}


class VisionTransformer(vision_transformer.VisionTransformer):
    """torchvision's ViT without the classifier: returns the CLS token after the final LayerNorm.

    The position embedding is learnt for ``image_size``; other sizes (multiples of the patch, e.g.
    multi-crop's small crops) get it resized bicubically, as DINO's ``interpolate_pos_encoding``
    (Caron et al. 2021) does. ``conv_proj`` is the patch projection that MoCo v3 freezes.
    """

    def __init__(self, image_size: int, patch_size: int, num_heads: int, hidden_dim: int,
                 num_layers: int = 12, mlp_ratio: int = 4, in_channels: int = 3) -> None:
        super().__init__(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                         num_heads=num_heads, hidden_dim=hidden_dim,
                         mlp_dim=mlp_ratio * hidden_dim)
        if in_channels != 3:
            # torchvision builds the patch projection for RGB; rebuilt, with its initialisation
            # (truncated normal of std sqrt(1 / fan_in), zero bias), for other channel counts.
            self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
            fan_in = in_channels * patch_size * patch_size
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        self.heads = nn.Identity()
        self.feature_dim = hidden_dim

    def position_embedding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """(1, 1 + grid_height * grid_width, hidden): the CLS position, then the patch grid's."""
        embedding = self.encoder.pos_embedding
        side = self.image_size // self.patch_size
        if (grid_height, grid_width) == (side, side):
            return embedding
        cls, grid = embedding[:, :1], embedding[:, 1:]
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_height, grid_width), mode="bicubic",
                             align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"a ViT backbone with {self.patch_size}-px patches needs image sides "
                              f"that are multiples of {self.patch_size} (data.image_size), got "
                              f"{height}x{width}")
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), patches], dim=1)
        tokens = tokens + self.position_embedding(height // self.patch_size,
                                                  width // self.patch_size)
        encoder = self.encoder
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))[:, 0]


def _build_vit(name: str, cifar_stem: bool, width: float, in_channels: int
               ) -> tuple[nn.Module, int]:
    heads, head_dim = _VITS[name]
    hidden_dim = heads * max(1, int(round(head_dim * width)))
    image_size, patch_size = (32, 4) if cifar_stem else (224, 16)
    model = VisionTransformer(image_size, patch_size, heads, hidden_dim, in_channels=in_channels)
    return model, model.feature_dim


def _build_timm(name: str, cifar_stem: bool, width: float, in_channels: int
                ) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as error:
        raise ConfigError(
            f"backbone.name={name!r} is not one of {backbone_names()}; other names are timm "
            "models, and timm is not installed (pip install 'selfsup[timm]')") from error
    if width != 1.0:
        raise ConfigError(f"backbone.width={width} applies to the built-in networks only, "
                          f"not to the timm model {name!r}")
    if name not in timm.list_models() and not timm.is_model(name):
        raise ConfigError(f"backbone.name={name!r} is neither a built-in network "
                          f"({', '.join(backbone_names())}) nor a timm model")
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    return model, int(model.num_features)


def require_feature_map(backbone: nn.Module, method: str) -> None:
    """Raise a :class:`ConfigError` naming the backbone unless it has ``feature_map(x)``, the
    spatial features before global pooling that ``method`` needs (the built-in ResNets have it;
    ViTs and timm models do not)."""
    if not callable(getattr(backbone, "feature_map", None)):
        raise ConfigError(f"{method} needs a backbone with a spatial feature map (backbone.name: "
                          f"one of {', '.join(_RESNETS)}); {type(backbone).__name__} has none")


def backbone_names() -> list[str]:
    return sorted([*_RESNETS, *_VITS])


def build_backbone(name: str, cifar_stem: bool = False, width: float = 1.0,
                   in_channels: int = 3) -> tuple[nn.Module, int]:
    """Build an encoder that maps (B, in_channels, H, W) images to (B, feature_dim) features.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50``, ``vit_tiny``, ``vit_small``, ``vit_base``,
            or any timm model name.
        cifar_stem: for 32x32 inputs: a 3x3 stride-1 first conv and no max-pool (ResNets),
            4-px patches (ViTs).
        width: channel multiplier of the built-in networks (1.0 = the paper's network).
        in_channels: channels of the input images: 3 for RGB; other counts for methods that
            encode a subset of channels (CMC's one encoder per colour channel group).
    """
    if width <= 0:
        raise ConfigError(f"backbone.width must be > 0, got {width}")
    if in_channels < 1:
        raise ValueError(f"a backbone needs at least one input channel, got {in_channels}")
    builder: Callable[[str, bool, float, int], tuple[nn.Module, int]]
    builder = (_build_resnet if name in _RESNETS else _build_vit if name in _VITS
               else _build_timm)
    return builder(name, cifar_stem, width, in_channels)
