"""lightly's CIFAR-10 benchmark recipe for SimCLR: the one copy that the benchmarks here use.

From lightly's ``docs/source/getting_started/benchmarks/cifar10_benchmark.py``: PIL images
through ``SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)`` (ImageNet
normalization) in DataLoader workers (shuffled, last partial batch dropped),
``SimCLRProjectionHead(D, D, 128)`` on the pooled backbone features, ``NTXentLoss()``
(temperature 0.5), one forward per view, fp32, SGD with lr 6e-2 x batch / 128 (its
``lr_factor = batch_size / 128``), momentum 0.9, weight decay 5e-4 on every parameter, and
``CosineAnnealingLR(optimizer, max_epochs)`` stepped once per epoch (as Lightning steps an
epoch-interval scheduler). The backbone is the caller's.

lightly is imported only inside the functions, so this module imports without it (the ``bench``
extra); :func:`require_lightly` stops with a clear message where it is missing.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from torch import nn

# lightly's SimCLR: lr = 6e-2 * lr_factor with lr_factor = batch_size / 128.
BASE_LR = 6e-2
BASE_BATCH = 128
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
PROJ_DIM = 128


def require_lightly() -> None:
    if importlib.util.find_spec("lightly") is None:
        raise SystemExit("lightly is not installed; it is in the bench extra: "
                         "pip install -e '.[bench]'")


def lightly_normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that ``SimCLRTransform`` normalizes with (lightly's ``IMAGENET_NORMALIZE``),
    for evaluating a lightly-trained backbone on the inputs it was trained on."""
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    return tuple(IMAGENET_NORMALIZE["mean"]), tuple(IMAGENET_NORMALIZE["std"])


class PILImages(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) as decoded PIL images in memory, each through ``transform``.
    (lightly's benchmark decodes PNG files in its workers; handing it decoded images only spares
    it work.)"""

    def __init__(self, images: np.ndarray, transform) -> None:
        from PIL import Image

        self.images = [Image.fromarray(image.transpose(1, 2, 0)) for image in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), 0


def lightly_loader(images: np.ndarray, batch_size: int, workers: int
                   ) -> torch.utils.data.DataLoader:
    """lightly's SimCLR training loader over uint8 images (N, 3, H, W); shuffling draws from the
    global torch generator."""
    from lightly.transforms import SimCLRTransform

    transform = SimCLRTransform(input_size=images.shape[-1], cj_strength=0.5, gaussian_blur=0.0)
    return torch.utils.data.DataLoader(PILImages(images, transform), batch_size=batch_size,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       persistent_workers=workers > 0)


class LightlySimCLR:
    """lightly's SimCLR model, loss and optimizer around ``backbone`` (pooled features of
    ``feature_dim``): :meth:`step` trains on one loader batch, :meth:`end_epoch` steps the
    cosine schedule of ``epochs`` epochs."""

    def __init__(self, backbone: nn.Module, feature_dim: int, batch_size: int, epochs: int,
                 device: torch.device) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.device = device
        self.backbone = backbone.to(device).train()
        self.head = SimCLRProjectionHead(feature_dim, feature_dim, PROJ_DIM).to(device).train()
        self.criterion = NTXentLoss()
        parameters = list(self.backbone.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.SGD(parameters, lr=BASE_LR * batch_size / BASE_BATCH,
                                         momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))

    def step(self, batch) -> int:
        """One optimizer step on a batch of ``lightly_loader``; returns its number of images."""
        (x0, x1), _ = batch
        x0 = x0.to(self.device, non_blocking=True)
        x1 = x1.to(self.device, non_blocking=True)
        loss = self.criterion(self.forward(x0), self.forward(x1))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return x0.shape[0]

    def end_epoch(self) -> None:
        self.scheduler.step()
