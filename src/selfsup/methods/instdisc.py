from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import nn

from selfsup.distributed import gather_no_grad
from selfsup.losses import memory_bank_softmax, nce
from selfsup.memory import MemoryBank
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


class UnitEmbedding(nn.Module):
    """``normalise(head(backbone(x)))``, in float32: the space of InstDisc's memory bank."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)).float(), dim=1)


@register_method
class InstDisc(Method):
    """Instance discrimination, InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via
    Non-Parametric Instance Discrimination", CVPR).

    Each image is its own class. A linear head maps the backbone's features to 128-d unit vectors
    f_i; a memory bank holds one such vector v_i per training sample (indexed by the sample index)
    and stands in for the class weights of a non-parametric softmax, P(i|f) = exp(v_i·f / t) / Z.

    - ``objective="nce"`` (the paper's, eq. 4-6): binary NCE against M noise samples drawn
      uniformly from the bank (Pn = 1/n) with the step's shared generator. One draw of M indices
      per step is shared by the batch (the authors' code draws M per sample; the expectation is
      the same and the scores are one (B, M) product instead of a (B, M, D) gather). Z is
      estimated once, by Monte Carlo over the first batch's noise scores,
      Z = n · mean_j exp(v_j·f / t), then fixed: a persistent buffer, so a resumed run keeps it.
    - ``objective="softmax"``: the full non-parametric softmax over the whole bank (eq. 2-3).

    Either way the proximal term of Section 3.3 is added: lambda · ||f_i - v_i||^2, the sample's
    feature now against its entry from the previous visit (v_i^(t) - v_i^(t-1) in the paper's
    notation); a sample's first visit has no previous entry and adds 0 (the term is averaged over
    the batch either way). The paper studies several lambda (Figure 3); the default here is 30.
    Its authors' code has no proximal term (lambda = 0) and relies on the bank momentum alone.
    After the loss is computed, the batch's entries are updated, v_i <- normalise(0.5 v_i + 0.5
    f_i) (bank momentum 0.5 of the authors' code; a first write replaces the random start), with
    the features of every process.
    Defaults: t = 0.07, M = 4096, 128-d, one view per sample.

    ``knn_bank()`` hands the bank to kNN evaluation: after training, the trainer reports
    ``knn_bank_top1`` (test images embedded by backbone + head, compared with the bank, the
    paper's protocol) beside ``knn_top1`` (backbone features of re-encoded training images, the
    protocol every method shares).
    """

    name = "instdisc"
    # The paper's augmentation (crop, colour jitter, grayscale, flip), which MoCo v1 copied.
    views = "moco_v1"
    num_views = 1
    # SGD, lr 0.03 per 256 images, momentum 0.9, weight decay 5e-4 (the authors' code); the paper
    # decays the lr in steps, the generic trainer's schedule is cosine.
    default_optimizer = {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "weight_decay": 5e-4,
                         "momentum": 0.9, "warmup_epochs": 0}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 objective: Literal["nce", "softmax"] = "nce", proj_dim: PositiveInt = 128,
                 num_noise: PositiveInt = 4096, temperature: PositiveFloat = 0.07,
                 bank_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5,
                 proximal_weight: NonNegativeFloat = 30.0) -> None:
        super().__init__(backbone, context)
        self.projector = nn.Linear(context.feature_dim, proj_dim)
        self.memory_bank = MemoryBank(context.num_samples, proj_dim)
        # Z of eq. 4; 0 until the first NCE step estimates it.
        self.register_buffer("normalizer", torch.zeros(()))
        self.objective = objective
        self.num_noise = num_noise
        self.temperature = temperature
        self.bank_momentum = bank_momentum
        self.proximal_weight = proximal_weight

    def knn_bank(self) -> tuple[torch.Tensor, nn.Module]:
        """The memory bank (row i = training sample i) and the network that embeds a query in
        its space: backbone, linear head, L2 normalisation (the paper's weighted kNN, Section
        3.4, compares a test image's embedding with the bank)."""
        return self.memory_bank.features, UnitEmbedding(self.backbone, self.projector)

    def training_step(self, batch: Batch) -> StepOutput:
        (view,) = batch.views
        features = self.backbone(view)
        # In float32: exp(v·f / 0.07) reaches e^14, and NCE compares it with M·Pn.
        embedding = F.normalize(self.projector(features).float(), dim=1)
        previous = self.memory_bank.read(batch.index)  # v_i^(t-1)
        if self.objective == "nce":
            loss = self._nce_loss(embedding, previous, batch.generator)
        else:
            loss = memory_bank_softmax(embedding @ self.memory_bank.snapshot().t(),
                                       batch.index.to(embedding.device), self.temperature)
        # A first visit has no v_i^(t-1) (the entry is still its random start): it adds 0.
        visited = self.memory_bank.is_written(batch.index).to(embedding.device)
        proximal = ((embedding - previous).pow(2).sum(dim=1) * visited).mean()
        total = loss + self.proximal_weight * proximal
        # After the bank was read: this step's entries become next visit's v_i^(t-1).
        self.memory_bank.update(gather_no_grad(batch.index.to(embedding.device)),
                                gather_no_grad(embedding.detach()), self.bank_momentum)
        logs = {self.objective: loss.detach(), "proximal": proximal.detach()}
        return StepOutput(total, logs=logs, features=features, embeddings=[embedding])

    def _nce_loss(self, embedding: torch.Tensor, positive: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        size = self.memory_bank.size
        noise_index = torch.randint(size, (self.num_noise,), generator=generator,
                                    device=generator.device)
        noise = self.memory_bank.read(noise_index)
        positive_logit = (embedding * positive).sum(dim=1, keepdim=True)
        logits = torch.cat([positive_logit, embedding @ noise.t()], dim=1) / self.temperature
        if self.normalizer.item() == 0:
            with torch.no_grad():
                estimate = logits[:, 1:].exp().mean() * size
                self.normalizer.fill_(gather_no_grad(estimate.reshape(1)).mean().item())
        scores = torch.exp(logits) / self.normalizer
        return nce(scores, 1.0 / size, self.num_noise)
