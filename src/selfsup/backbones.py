"""Encoders: ``build_backbone(name) -> (module, feature_dim)``.

ResNets are assembled from torchvision's own ``BasicBlock``/``Bottleneck`` with the attribute
names of ``torchvision.models.ResNet`` (so torchvision state dicts load at width 1), plus the two
things SSL papers change:

- the CIFAR stem (SimCLR, Chen et al. 2020, Appendix B.9): a 3x3 stride-1 first conv and no max-pool,
  so 32x32 images keep their resolution into ``layer1``;
- a width multiplier, so the same architecture runs at CPU-demo and unit-test sizes.

Any other name is handed to timm (``timm.create_model(name, num_classes=0)``) when timm is
installed, so every timm model is a backbone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
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
                 cifar_stem: bool = False) -> None:
        super().__init__()
        widths = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _build_resnet(name: str, cifar_stem: bool, width: float) -> tuple[nn.Module, int]:
    block, layers = _RESNETS[name]
    model = ResNet(block, layers, width=width, cifar_stem=cifar_stem)
    return model, model.feature_dim


def _build_timm(name: str, cifar_stem: bool, width: float) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as error:
        raise ConfigError(
            f"backbone.name={name!r} is not one of {sorted(_RESNETS)}; other names are timm "
            "models, and timm is not installed (pip install 'selfsup[timm]')") from error
    if width != 1.0:
        raise ConfigError(f"backbone.width={width} applies to the built-in ResNets only, "
                          f"not to the timm model {name!r}")
    if name not in timm.list_models() and not timm.is_model(name):
        raise ConfigError(f"backbone.name={name!r} is neither a built-in ResNet "
                          f"({', '.join(sorted(_RESNETS))}) nor a timm model")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    return model, int(model.num_features)


def backbone_names() -> list[str]:
    return sorted(_RESNETS)


def build_backbone(name: str, cifar_stem: bool = False, width: float = 1.0
                   ) -> tuple[nn.Module, int]:
    """Build an encoder that maps (B, 3, H, W) images to (B, feature_dim) features.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50``, or any timm model name.
        cifar_stem: 3x3 stride-1 first conv and no max-pool, for 32x32 inputs.
        width: channel multiplier of the built-in ResNets (1.0 = the paper's network).
    """
    if width <= 0:
        raise ConfigError(f"backbone.width must be > 0, got {width}")
    builder: Callable[[str, bool, float], tuple[nn.Module, int]]
    builder = _build_resnet if name in _RESNETS else _build_timm
    return builder(name, cifar_stem, width)
