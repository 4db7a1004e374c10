from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from selfsup.distributed import world_size
from selfsup.heads import ProjectionMLP
from selfsup.losses import swav
from selfsup.memory import Queue
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method

# The two full-resolution crops give codes; every crop is predicted from them (the reference's
# --crops_for_assign 0 1).
NUM_CODE_VIEWS = 2


def resolution_groups(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive views of equal size, grouped: each group is one backbone pass, as in the
    reference (so the two global crops share BatchNorm statistics, and so do the local ones)."""
    groups: list[list[torch.Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape == view.shape:
            groups[-1].append(view)
        else:
            groups.append([view])
    return groups


@register_method
class SwAV(Method):
    """SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments", NeurIPS).

    Every view is encoded, projected and L2-normalised (z), and scored against K prototypes c
    (a linear layer without bias whose weight rows are L2-normalised in place at the start of
    every step, as the reference does). The codes of the two global views are computed online by
    Sinkhorn-Knopp over the batch of every process (eps = 0.05, 3 iterations) and each is predicted
    from every other view, local crops included: :func:`selfsup.losses.swav`.

    - Prototypes frozen at first: during the first ``freeze_prototypes_epochs`` epochs their
      gradient is cancelled after backward (the reference's ``freeze_prototypes_niters``, one epoch
      in its recipes), so the step leaves them untouched.
    - Small batches (Section 3.1): when the global batch is smaller than the number of prototypes,
      an equal partition of the batch over the prototypes is impossible, so, from epoch
      ``queue_start_epoch`` on, the projections of past batches (``queue_size`` of them, split
      over the processes as in the reference) join the Sinkhorn problem; they get no code and no
      loss. The queue is used once it is full (the reference waits for a full queue too), and its
      contents, fill count and position are checkpointed buffers.

    Defaults are the paper's: projector 2048 hidden units with BN, 128 outputs; 3000 prototypes;
    multi-crop with 2 global and 6 local crops; T = 0.1; queue 3840 from epoch 15 (the batch-256
    recipe); prototypes frozen for the first epoch. Optimizer: the reference's batch-256 recipe
    (``swav_200ep_bs256_pretrain.sh``): LARS, lr 0.6 for 256 images, weight decay 1e-6, no
    warm-up, cosine. Views: the ``swav`` multi-crop recipe, 2 global crops then
    ``num_local_crops`` local ones (``training_step`` takes any number of views, the first two
    being the global ones). Evaluation uses the backbone (there is no momentum network).
    """

    name = "swav"
    views = "swav"
    default_optimizer = {"name": "lars", "lr": 0.6, "lr_scaling": "linear",
                         "weight_decay": 1e-6, "warmup_epochs": 0}

    def __init__(self, backbone: nn.Module, context: MethodContext,
                 proj_hidden_dim: PositiveInt = 2048, proj_dim: PositiveInt = 128,
                 num_prototypes: PositiveInt = 3000, num_local_crops: NonNegativeInt = 6,
                 temperature: PositiveFloat = 0.1,
                 epsilon: PositiveFloat = 0.05, sinkhorn_iterations: PositiveInt = 3,
                 queue_size: NonNegativeInt = 3840, queue_start_epoch: NonNegativeFloat = 15.0,
                 freeze_prototypes_epochs: NonNegativeFloat = 1.0) -> None:
        super().__init__(backbone, context)
        self.num_views = NUM_CODE_VIEWS + num_local_crops
        self.projector = ProjectionMLP(context.feature_dim, proj_hidden_dim, proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.queues = nn.ModuleList(
            [Queue(queue_size, proj_dim) for _ in range(NUM_CODE_VIEWS)] if queue_size else [])
        # How many queue rows hold real projections (the Queue starts as random vectors).
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.queue_start_epoch = queue_start_epoch
        self.freeze_prototypes_epochs = freeze_prototypes_epochs

    def queue_wanted(self, epoch: float, batch_size: int) -> bool:
        """Whether this step feeds the queue: it exists, its epoch has come, and the global batch
        is too small to be split evenly over the prototypes."""
        return (len(self.queues) > 0 and epoch >= self.queue_start_epoch
                and batch_size * world_size() < self.prototypes.out_features)

    @torch.no_grad()
    def queued_scores(self) -> list[torch.Tensor] | None:
        """The prototype scores of this process's share of the queue, once that share is full."""
        length = self.queues[0].size // world_size()
        if int(self.queue_filled) < length:
            return None
        scores = []
        for queue in self.queues:
            newest = (queue.pointer - length + torch.arange(length, device=queue.keys.device)
                      ) % queue.size
            scores.append(self.prototypes(queue.keys[newest]))
        return scores

    @torch.no_grad()
    def enqueue(self, projections: list[torch.Tensor]) -> None:
        for queue, z in zip(self.queues, projections):
            queue.push(z)
        self.queue_filled.add_(projections[0].shape[0]).clamp_(max=self.queues[0].size)

    def training_step(self, batch: Batch) -> StepOutput:
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        batch_size = batch.views[0].shape[0]
        features: torch.Tensor | None = None
        projections: list[torch.Tensor] = []
        for group in resolution_groups(batch.views):
            encoded = self.backbone(torch.cat(group))
            if features is None:
                features = encoded[:batch_size]
            projections += F.normalize(self.projector(encoded), dim=1).split(batch_size)
        scores = [self.prototypes(z) for z in projections]
        extra_scores = None
        if self.queue_wanted(batch.epoch, batch_size):
            # Read before the push: the batch's own projections are in the problem already.
            extra_scores = self.queued_scores()
            self.enqueue([z.detach() for z in projections[:NUM_CODE_VIEWS]])
        loss = swav(scores, self.temperature, self.epsilon, self.sinkhorn_iterations,
                    NUM_CODE_VIEWS, extra_scores, gather_distributed=True)
        return StepOutput(loss, logs={"queue_active": float(extra_scores is not None)},
                          features=features, embeddings=projections[:NUM_CODE_VIEWS])

    def on_before_optimizer_step(self, epoch: float) -> None:
        if epoch < self.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None
