from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt
from torch import nn

from selfsup.augment.ops import rgb_to_lab
from selfsup.distributed import gather_no_grad
from selfsup.errors import ConfigError
from selfsup.losses import info_nce, memory_bank_softmax, nce
from selfsup.memory import MemoryBank
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method

LAB_CHANNELS = "Lab"
# The range of each Lab channel over the sRGB gamut (L: black to white; a: green to magenta;
# b: blue to yellow). The CMC code normalises each channel to [-1, 1] with these numbers
# (mean = centre, std = half the range, in ``train_CMC.py``).
LAB_RANGES = ((0.0, 100.0), (-86.183, 98.233), (-107.857, 94.478))


def _check_view_channels(views: tuple[str, ...]) -> tuple[str, ...]:
    """Views are disjoint, non-empty groups of the Lab channels, at least two of them."""
    if len(views) < 2:
        raise ValueError(f"CMC contrasts at least two views, got {list(views)}")
    seen: set[str] = set()
    for view in views:
        if not view or any(channel not in LAB_CHANNELS for channel in view):
            raise ValueError(f"view {view!r} must be made of the Lab channels 'L', 'a', 'b' "
                             f"(e.g. ['L', 'ab'] or ['L', 'a', 'b'])")
        if len(set(view)) != len(view) or seen & set(view):
            raise ValueError(f"each Lab channel may belong to one view only, got {list(views)}")
        seen |= set(view)
    return views


ViewChannels = Annotated[tuple[str, ...], AfterValidator(_check_view_channels)]


class LabViewEncoders(nn.Module):
    """CMC's evaluated network: one encoder per view of the Lab image, features concatenated.

    Takes the images every backbone takes, RGB normalised with the data's ``image_mean`` /
    ``image_std``; undoes that normalisation, converts to Lab
    (:func:`selfsup.augment.ops.rgb_to_lab`), scales each Lab channel to [-1, 1] as the CMC code
    does, and gives each encoder its view's channels (``view_channels``, e.g. ``("L", "ab")``).
    ``forward`` returns the concatenation of the encoders' features, the representation the
    paper's linear evaluation reads (the CMC code concatenates the L and ab encoders' pooled
    features).
    """

    def __init__(self, encoders: Sequence[nn.Module], feature_dims: Sequence[int],
                 view_channels: Sequence[str], image_mean: Sequence[float],
                 image_std: Sequence[float]) -> None:
        super().__init__()
        if not len(encoders) == len(feature_dims) == len(view_channels):
            raise ValueError(f"{len(encoders)} encoders, {len(feature_dims)} feature sizes and "
                             f"{len(view_channels)} views: one of each per view")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ConfigError(f"CMC converts RGB images to Lab: the data must have 3 channels, "
                              f"its normalisation has mean {list(image_mean)}, "
                              f"std {list(image_std)}")
        self.encoders = nn.ModuleList(encoders)
        self.feature_dims = tuple(feature_dims)
        self.view_channels = tuple(view_channels)
        self.channel_index = [[LAB_CHANNELS.index(c) for c in view] for view in view_channels]
        # Not persistent: they follow from the data and the method, not from training.
        shape = (1, 3, 1, 1)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(shape), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(shape), persistent=False)
        low, high = torch.tensor(LAB_RANGES).unbind(dim=1)
        self.register_buffer("lab_centre", ((low + high) / 2).view(shape), persistent=False)
        self.register_buffer("lab_half_range", ((high - low) / 2).view(shape), persistent=False)

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_dims)

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each view's Lab channels ``(B, len(view), H, W)``, every channel scaled to [-1, 1]."""
        rgb = images.float() * self.image_std + self.image_mean
        lab = (rgb_to_lab(rgb) - self.lab_centre) / self.lab_half_range
        return [lab[:, index] for index in self.channel_index]

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The features of each view, by its own encoder."""
        return [encoder(view) for encoder, view in zip(self.encoders, self.views(images))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encode(images), dim=1)


@register_method
class CMC(Method):
    """Contrastive Multiview Coding, CMC (Tian, Krishnan & Isola 2019, "Contrastive Multiview
    Coding", ECCV 2020).

    The views are channel groups of one augmented image in Lab colour space, by default L and ab
    as in the paper's ImageNet experiments (``view_channels``; ``["L", "a", "b"]`` gives three).
    Each view has its own encoder (the configured backbone with as many input channels as the
    view has) and a linear head to 128-d unit vectors z_i, as in the authors' code. For views V1,
    V2 the paper's loss (eq. 2-3) anchors each view in turn and contrasts it against the other::

        L(V1, V2) = L_contrast(V1, V2) + L_contrast(V2, V1)
        L_contrast(V1, V2) = -E log  h(v1_i, v2_i) / sum_{j=1..K+1} h(v1_i, v2_j),
        h(x, y) = exp(z1(x)·z2(y) / t)

    and with M views the "full graph" of eq. 6 sums L(Vi, Vj) over all pairs i < j, i.e. every
    ordered pair once. ``objective`` chooses where the K negatives come from:

    - ``"nce"`` (the authors' code's default) and ``"softmax"`` (its ``--softmax``): a memory bank
      per view holds one 128-d vector per training sample (:class:`selfsup.memory.MemoryBank`,
      momentum 0.5). The anchor z_i of view i meets the bank of view j: its positive is the
      bank's entry of the same sample, its negatives the entries of K samples drawn uniformly,
      one draw per step shared by the batch and by all pairs (the code draws per sample, and
      shares the draw between both views' banks). ``"softmax"`` is the (K+1)-way cross-entropy
      with the positive as target (``memory_bank_softmax``); ``"nce"`` is InstDisc's binary NCE
      (``nce``, Pn = 1/n) on exp(logit) / Z, with one constant Z per ordered pair estimated
      on the first step as n · mean over the noise of exp(z·v / t) (the code averages over the
      positive too), then fixed (a persistent buffer). After the loss, each bank takes its
      view's embeddings of the batch (of every process): v <- normalise(0.5 v + 0.5 z), a
      row's first write replacing its random start (:class:`selfsup.memory.MemoryBank`).
    - ``"in_batch"``: no bank, InfoNCE over the batch (``info_nce``): the other samples' view-j
      embeddings of the global batch (gathered with their gradient) are the negatives.

    Evaluation (kNN, linear probe, the online probe) reads ``backbone``: RGB images, converted
    to Lab, through every view's encoder, features concatenated (the paper's linear evaluation
    concatenates the L and ab features), so ``context.feature_dim`` is the sum of the encoders'.
    ``backbone.width`` is each encoder's width: the paper's "ResNet-50 v1" (half width per view,
    so the pair costs about one ResNet-50) is ``width: 0.5``.

    Defaults (the authors' ``train_CMC.py``): K = 16384 negatives, t = 0.07, bank momentum 0.5,
    128-d heads; SGD lr 0.03 at batch 128, momentum 0.9, weight decay 1e-4. Its augmentation is
    the ``cmc`` recipe: crop and flip, no colour jitter.
    """

    name = "cmc"
    views = "cmc"
    # One augmented crop per image: the views are its channel groups, split in the method.
    num_views = 1
    # train_CMC.py: SGD lr 0.03 at batch 128 (0.06 per 256 images), momentum 0.9, weight decay
    # 1e-4, no warm-up; it decays the lr in steps, the generic trainer's schedule is cosine.
    default_optimizer = {"name": "sgd", "lr": 0.06, "lr_scaling": "linear", "weight_decay": 1e-4,
                         "momentum": 0.9, "warmup_epochs": 0}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 view_channels: ViewChannels = ("L", "ab"),
                 objective: Literal["nce", "softmax", "in_batch"] = "nce",
                 proj_dim: PositiveInt = 128, num_negatives: PositiveInt = 16384,
                 temperature: PositiveFloat = 0.07,
                 bank_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5) -> None:
        if context.backbone_factory is None:
            raise ConfigError("method=cmc builds one encoder per view and needs a backbone "
                              "factory in its MethodContext (the trainer gives one)")
        # The RGB ``backbone`` the trainer built is left unused: every view has an encoder of
        # its own, for its number of channels.
        encoders, dims = zip(*(context.backbone_factory(len(view)) for view in view_channels))
        evaluated = LabViewEncoders(encoders, dims, view_channels, context.image_mean,
                                    context.image_std)
        super().__init__(evaluated, dataclasses.replace(context, feature_dim=evaluated.feature_dim))
        self.view_channels = tuple(view_channels)
        self.projectors = nn.ModuleList(nn.Linear(dim, proj_dim) for dim in dims)
        # (anchor view, contrasted view): every ordered pair, the full graph of eq. 6.
        self.pairs = [(i, j) for i in range(len(view_channels))
                      for j in range(len(view_channels)) if i != j]
        self.objective = objective
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.bank_momentum = bank_momentum
        self.memory_banks = nn.ModuleList(
            MemoryBank(context.num_samples, proj_dim) for _ in view_channels
        ) if objective != "in_batch" else nn.ModuleList()
        if objective == "nce":
            # One Z per ordered pair; 0 until the first step estimates it.
            self.register_buffer("normalizers", torch.zeros(len(self.pairs)))

    def pair_name(self, anchor: int, other: int) -> str:
        return f"{self.view_channels[anchor]}_{self.view_channels[other]}"

    def training_step(self, batch: Batch) -> StepOutput:
        (image,) = batch.views
        features = self.backbone.encode(image)
        # In float32: NCE compares exp(z·v / 0.07), up to e^14, with K·Pn.
        embeddings = [F.normalize(projector(feature).float(), dim=1)
                      for projector, feature in zip(self.projectors, features)]
        if self.objective == "in_batch":
            losses = [info_nce(embeddings[i], embeddings[j], temperature=self.temperature,
                               gather_distributed=True) for i, j in self.pairs]
        else:
            losses = self._memory_bank_losses(embeddings, batch)
            # After every pair has read the banks: this step's entries serve the next visit.
            index = gather_no_grad(batch.index.to(embeddings[0].device))
            for bank, embedding in zip(self.memory_banks, embeddings):
                bank.update(index, gather_no_grad(embedding.detach()), self.bank_momentum)
        logs = {f"{self.objective}_{self.pair_name(i, j)}": loss.detach()
                for (i, j), loss in zip(self.pairs, losses)}
        return StepOutput(torch.stack(losses).sum(), logs=logs,
                          features=torch.cat(features, dim=1), embeddings=embeddings)

    def _memory_bank_losses(self, embeddings: list[torch.Tensor], batch: Batch
                            ) -> list[torch.Tensor]:
        """L_contrast(Vi, Vj) of every ordered pair, against view j's bank."""
        size = self.context.num_samples
        generator = batch.generator
        noise_index = torch.randint(size, (self.num_negatives,), generator=generator,
                                    device=generator.device)
        positives = [bank.read(batch.index) for bank in self.memory_banks]
        noise = [bank.read(noise_index) for bank in self.memory_banks]
        similarities = [torch.cat([(embeddings[i] * positives[j]).sum(dim=1, keepdim=True),
                                   embeddings[i] @ noise[j].t()], dim=1) for i, j in self.pairs]
        if self.objective == "softmax":
            target = torch.zeros(embeddings[0].shape[0], dtype=torch.long,
                                 device=embeddings[0].device)
            return [memory_bank_softmax(s, target, self.temperature) for s in similarities]
        logits = [s / self.temperature for s in similarities]
        if bool((self.normalizers == 0).any()):
            with torch.no_grad():
                estimates = torch.stack([pair[:, 1:].exp().mean() for pair in logits]) * size
                # The mean over processes, so every process holds the same constants.
                estimates = gather_no_grad(estimates[None]).mean(dim=0)
                self.normalizers.copy_(torch.where(self.normalizers == 0, estimates,
                                                   self.normalizers))
        return [nce(pair.exp() / normalizer, 1.0 / size, self.num_negatives)
                for pair, normalizer in zip(logits, self.normalizers)]
