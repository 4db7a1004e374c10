from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from selfsup.distributed import gather_no_grad
from selfsup.ema import MomentumCopy
from selfsup.heads import ProjectionMLP
from selfsup.losses import nt_xent
from selfsup.memory import Queue
from selfsup.methods.base import Batch, MethodContext, StepOutput, register_method
from selfsup.methods.simclr import SimCLR


@register_method
class SimCLRv2(SimCLR):
    """SimCLR v2 (Chen, Kornblith, Swersky, Norouzi & Hinton 2020, "Big Self-Supervised Models
    are Strong Semi-Supervised Learners", NeurIPS), stage 1: pretraining.

    SimCLR's two views, one encoder and NT-Xent, with the two changes of Section 2 that apply at
    any network size:

    - a deeper projection head: 3 layers, Linear-BN-ReLU twice (hidden = feature dim), then
      Linear-BN to 128 (the authors' ``ProjectionHead``: BN on every layer, none of them biased
      before a BN; our last BN has no scale either);
    - the memory mechanism of MoCo: a *memory network*, a moving average (momentum 0.999) of
      backbone + head, encodes one view of every image; its outputs are buffered in a queue and
      serve the next steps as extra negatives. The positives and the in-batch negatives stay
      SimCLR's (the online network, the whole global batch). The paper reports about +1% from it
      (linear evaluation and 1% fine-tuning, Section 2 / Appendix) even at batch 4096, and its
      ImageNet setting has it on (Section 4: buffer 64K, EMA 0.999), so it is on by default with
      those values; ``queue_size=0`` turns it off (no memory network, no extra forward pass).
      A buffer of 64K is more than CIFAR-10's 50K images: it would hold older keys of the very
      images it contrasts, so ``configs/simclrv2_cifar10.yaml`` uses MoCo's CIFAR 4096 / 0.99.

    Defaults (Section 4): temperature 0.1 (SimCLR's ImageNet value, which v2 keeps), LARS with
    momentum 0.9, lr 6.4 at batch 4096 (0.1 x sqrt(batch): 1.6 per 256 images, square-root
    scaling), weight decay 1e-4, warm-up over the first 5% of the paper's 800 epochs, then cosine.

    Evaluation: kNN and linear probes read the online backbone. Fine-tuning (stage 2,
    ``selfsup eval finetune``) trains the backbone *and the head's first layer* under the
    classifier, the paper's default for 1% and 10% of the labels (Section 4; Figure 3: the
    first layer beats the head's input most with few labels); with all labels it fine-tunes
    from the head's input, the backbone alone. Stage 3, self-distillation of that classifier
    into a student on the unlabeled images, is ``selfsup distill`` (:mod:`selfsup.distill`).
    """

    name = "simclrv2"
    views = "simclr"
    # LARS (momentum 0.9), 0.1 x sqrt(batch) = 1.6 x sqrt(batch / 256), weight decay 1e-4, linear
    # warm-up over 5% of 800 epochs (Section 4, "Settings and implementation details").
    default_optimizer = {"name": "lars", "lr": 1.6, "lr_scaling": "sqrt", "weight_decay": 1e-4,
                         "warmup_epochs": 40}
    # Below this share of the labels the paper fine-tunes from the first head layer (1%, 10%),
    # at 100% from the head's input (Section 4).
    ALL_LABELS = 1.0

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt | None = None, proj_dim: PositiveInt = 128,
                 temperature: PositiveFloat = 0.1, queue_size: NonNegativeInt = 65536,
                 momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.999) -> None:
        super().__init__(backbone, context, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim,
                         temperature=temperature)
        self.momentum = momentum
        self.memory_encoder: MomentumCopy | None = None
        self.queue: Queue | None = None
        if queue_size > 0:
            self.memory_encoder = MomentumCopy(nn.Sequential(self.backbone, self.projector))
            self.queue = Queue(queue_size, proj_dim)

    @staticmethod
    def build_projector(feature_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
        return ProjectionMLP(feature_dim, hidden_dim, out_dim, num_layers=3, batch_norm=True,
                             output_batch_norm=True)

    def head_first_layer(self) -> nn.Sequential:
        """The projection head's first layer, Linear-BN-ReLU (shares the head's modules)."""
        layers = list(self.projector)
        end = next(i for i, module in enumerate(layers) if isinstance(module, nn.ReLU))
        return nn.Sequential(*layers[: end + 1])

    def finetune_encoder(self, label_fraction: float) -> nn.Module:
        if label_fraction >= self.ALL_LABELS:
            return self.backbone
        return nn.Sequential(self.backbone, self.head_first_layer())

    def training_step(self, batch: Batch) -> StepOutput:
        x1, x2 = batch.views
        # One forward over both views: BN sees all 2N views, as in SimCLR.
        features = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projector(features).chunk(2)
        if self.queue is None:
            loss = nt_xent(z1, z2, self.temperature, gather_distributed=True)
            return StepOutput(loss, features=features[: x1.shape[0]], embeddings=[z1, z2])
        with torch.no_grad():
            memory = F.normalize(self.memory_encoder(x2), dim=1)
        # The buffer is read before this step's outputs join it: no view is its own negative.
        loss = nt_xent(z1, z2, self.temperature, gather_distributed=True,
                       negative_keys=self.queue.snapshot())
        self.queue.push(gather_no_grad(memory))
        return StepOutput(loss, features=features[: x1.shape[0]], embeddings=[z1, z2])

    def on_after_optimizer_step(self, progress: float) -> None:
        if self.memory_encoder is not None:
            self.memory_encoder.update(nn.Sequential(self.backbone, self.projector),
                                       self.momentum)
