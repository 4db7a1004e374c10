"""lightly's CIFAR-10 benchmark recipes: the one copy that the benchmarks here use.

From lightly's ``docs/source/getting_started/benchmarks/cifar10_benchmark.py``, each method as
that script trains it: PIL images through lightly's transform in DataLoader workers (shuffled, the
last partial batch dropped; ImageNet normalization, no blur at 32 px), the heads on the pooled
backbone features (``D`` wide), fp32, one forward per view, and
``CosineAnnealingLR(optimizer, max_epochs)`` stepped once per epoch (as Lightning steps an
epoch-interval scheduler). ``lr_factor = batch_size / 128`` scales the learning rates as the
script does. The backbone is the caller's.

- ``simclr``: ``SimCLRTransform(cj_strength=0.5)``, ``SimCLRProjectionHead(D, D, 128)``,
  ``NTXentLoss()`` (temperature 0.5); SGD lr 6e-2 x lr_factor, momentum 0.9, weight decay 5e-4.
- ``byol``: the SimCLR transform; ``BYOLProjectionHead(D, 1024, 256)``,
  ``BYOLPredictionHead(256, 1024, 256)``; a target copy of backbone and projector with momentum
  0.99 (updated at the start of each step); the symmetric negative cosine; SGD as simclr.
- ``simsiam``: the SimCLR transform; projector D -> 2048 (BN, ReLU) -> 2048 (BN),
  ``SimSiamPredictionHead(2048, 512, 2048)``; the stop-gradient on the projections; SGD lr 6e-2
  *unscaled* (the script's choice for stability), momentum 0.9, weight decay 5e-4.
- ``swav``: ``SwaVTransform`` with two 32 px crops of scale (0.14, 1); ``SwaVProjectionHead(D, D,
  128)``, L2-normalised, ``SwaVPrototypes(128, 512)`` normalised at each step, never frozen, no
  queue; ``SwaVLoss()``; Adam lr 1e-3 x lr_factor, weight decay 1e-6.
- ``dino``: ``DINOTransform`` with two 32 px global crops, no local ones; ``DINOProjectionHead``
  with the script's two layers D -> 2048 (BN, GELU) -> 256, weight-normalised last layer to 2048;
  a teacher copy with momentum 0.99; ``DINOLoss(output_dim=2048)`` (its defaults: teacher
  temperature 0.04, centre momentum 0.9); SGD as simclr. lightly's script evaluates the student.

lightly is imported only inside the functions, so this module imports without it (the ``bench``
extra); :func:`require_lightly` stops with a clear message where it is missing.
"""

from __future__ import annotations

import abc
import copy
import importlib.util

import numpy as np
import torch
from torch import nn

# The script's learning rates are given for 128 images: lr x lr_factor, lr_factor = batch / 128.
BASE_BATCH = 128
SGD_LR = 6e-2
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
TARGET_MOMENTUM = 0.99


def require_lightly() -> None:
    if importlib.util.find_spec("lightly") is None:
        raise SystemExit("lightly is not installed; it is in the bench extra: "
                         "pip install -e '.[bench]'")


def lightly_normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that lightly's transforms normalize with (``IMAGENET_NORMALIZE``), for
    evaluating a lightly-trained backbone on the inputs it was trained on."""
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


class LightlyRecipe(abc.ABC):
    """One method of lightly's script around ``backbone`` (pooled features of ``feature_dim``):
    :meth:`step` trains on one batch of :func:`lightly_loader` (a list of views), :meth:`end_epoch`
    steps the cosine schedule of ``epochs`` epochs. A recipe's :meth:`build` makes its heads and
    sets ``trained`` (the modules the optimizer updates); it defines :meth:`loss`, and
    :meth:`make_optimizer` where the script's optimizer is not its SGD."""

    trained: nn.ModuleList

    @staticmethod
    def transform(image_size: int):
        from lightly.transforms import SimCLRTransform

        return SimCLRTransform(input_size=image_size, cj_strength=0.5, gaussian_blur=0.0)

    def __init__(self, backbone: nn.Module, feature_dim: int, batch_size: int, epochs: int,
                 device: torch.device) -> None:
        self.device = device
        self.backbone = backbone.to(device)
        self.lr_factor = batch_size / BASE_BATCH
        self.build(feature_dim)
        self.trained.to(device).train()
        self.optimizer = self.make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, epochs)

    @abc.abstractmethod
    def build(self, feature_dim: int) -> None:
        """Make the heads (and any target network) and set ``trained``."""

    @abc.abstractmethod
    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The script's loss of one batch of views (momentum updates first, where it has them)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trained.parameters(), lr=SGD_LR * self.lr_factor,
                               momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(1)

    def step(self, batch) -> int:
        """One optimizer step on a batch of ``lightly_loader``; returns its number of images."""
        views, _ = batch
        views = [view.to(self.device, non_blocking=True) for view in views]
        self.loss(views).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return views[0].shape[0]

    def end_epoch(self) -> None:
        self.scheduler.step()


def frozen_copy(module: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    target = copy.deepcopy(module)
    deactivate_requires_grad(target)
    return target


class LightlySimCLR(LightlyRecipe):
    def build(self, feature_dim: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.head = SimCLRProjectionHead(feature_dim, feature_dim, 128)
        self.criterion = NTXentLoss()
        self.trained = nn.ModuleList([self.backbone, self.head])

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        x0, x1 = views
        return self.criterion(self.head(self.pooled(x0)), self.head(self.pooled(x1)))


class LightlyBYOL(LightlyRecipe):
    def build(self, feature_dim: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        self.projector = BYOLProjectionHead(feature_dim, 1024, 256)
        self.predictor = BYOLPredictionHead(256, 1024, 256)
        self.target_backbone = frozen_copy(self.backbone).to(self.device)
        self.target_projector = frozen_copy(self.projector).to(self.device)
        self.criterion = NegativeCosineSimilarity()
        self.trained = nn.ModuleList([self.backbone, self.projector, self.predictor])

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.target_backbone, m=TARGET_MOMENTUM)
        update_momentum(self.projector, self.target_projector, m=TARGET_MOMENTUM)
        x0, x1 = views
        p0, p1 = (self.predictor(self.projector(self.pooled(x))) for x in (x0, x1))
        with torch.no_grad():
            z0, z1 = (self.target_projector(self.target_backbone(x).flatten(1)) for x in (x0, x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class LightlySimSiam(LightlyRecipe):
    def build(self, feature_dim: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead
        from lightly.models.modules.heads import ProjectionHead

        self.projector = ProjectionHead([
            (feature_dim, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
            (2048, 2048, nn.BatchNorm1d(2048), None)])
        self.predictor = SimSiamPredictionHead(2048, 512, 2048)
        self.criterion = NegativeCosineSimilarity()
        self.trained = nn.ModuleList([self.backbone, self.projector, self.predictor])

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trained.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM,
                               weight_decay=SGD_WEIGHT_DECAY)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z0, z1 = (self.projector(self.pooled(x)) for x in views)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(z0.detach(), p1) + self.criterion(z1.detach(), p0))


class LightlySwaV(LightlyRecipe):
    @staticmethod
    def transform(image_size: int):
        from lightly.transforms import SwaVTransform

        return SwaVTransform(crop_sizes=[image_size], crop_counts=[2], crop_min_scales=[0.14],
                             crop_max_scales=[1.0], gaussian_blur=0.0)

    def build(self, feature_dim: int) -> None:
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        self.projector = SwaVProjectionHead(feature_dim, feature_dim, 128)
        self.prototypes = SwaVPrototypes(128, 512, n_steps_frozen_prototypes=0)
        self.criterion = SwaVLoss()
        self.trained = nn.ModuleList([self.backbone, self.projector, self.prototypes])

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trained.parameters(), lr=1e-3 * self.lr_factor,
                                weight_decay=1e-6)

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        self.prototypes.normalize()
        scores = [self.prototypes(nn.functional.normalize(self.projector(self.pooled(x)), dim=1))
                  for x in views]
        return self.criterion(scores[:2], scores[2:])


class LightlyDINO(LightlyRecipe):
    @staticmethod
    def transform(image_size: int):
        from lightly.transforms import DINOTransform

        return DINOTransform(global_crop_size=image_size, n_local_views=0,
                             gaussian_blur=(0.0, 0.0, 0.0))

    @staticmethod
    def head(feature_dim: int) -> nn.Module:
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.modules.heads import ProjectionHead

        head = DINOProjectionHead(feature_dim, 2048, 256, 2048, batch_norm=True)
        # The script's two layers for CIFAR-10.
        head.layers = ProjectionHead([(feature_dim, 2048, nn.BatchNorm1d(2048), nn.GELU()),
                                      (2048, 256, None, None)]).layers
        return head

    def build(self, feature_dim: int) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.utils import deactivate_requires_grad

        self.student_head = self.head(feature_dim)
        self.teacher_backbone = frozen_copy(self.backbone).to(self.device)
        # A head of its own, as the script builds it (a weight-normalised layer cannot be
        # deep-copied).
        self.teacher_head = self.head(feature_dim).to(self.device)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=2048)
        self.epoch = 0
        self.trained = nn.ModuleList([self.backbone, self.student_head])

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.teacher_backbone, m=TARGET_MOMENTUM)
        update_momentum(self.student_head, self.teacher_head, m=TARGET_MOMENTUM)
        teacher = [self.teacher_head(self.teacher_backbone(x).flatten(1)) for x in views[:2]]
        student = [self.student_head(self.pooled(x)) for x in views]
        return self.criterion(teacher, student, epoch=self.epoch)

    def end_epoch(self) -> None:
        super().end_epoch()
        self.epoch += 1


LIGHTLY_RECIPES: dict[str, type[LightlyRecipe]] = {
    "simclr": LightlySimCLR, "byol": LightlyBYOL, "simsiam": LightlySimSiam,
    "swav": LightlySwaV, "dino": LightlyDINO}


def lightly_loader(images: np.ndarray, batch_size: int, workers: int,
                   recipe: type[LightlyRecipe] = LightlySimCLR) -> torch.utils.data.DataLoader:
    """``recipe``'s training loader over uint8 images (N, 3, H, W); shuffling draws from the
    global torch generator."""
    return torch.utils.data.DataLoader(
        PILImages(images, recipe.transform(images.shape[-1])), batch_size=batch_size,
        shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0)
