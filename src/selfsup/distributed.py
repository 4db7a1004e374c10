"""Cross-process collectives used by the losses and methods.

Global negatives need the embeddings of every process *with* their gradient: each process computes
the loss of its own anchors against all keys, and the backward pass must send each key's gradient
back to the process that produced it. ``torch.distributed.nn.functional.all_gather`` does exactly
that (its backward is a reduce-scatter), so it is written once here and used by every loss
(open_clip's ``gather_features`` is the model for this).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0, keeping the gradient path.

    In one process this is the identity, so the same loss code runs everywhere.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    # Gathered as 2-D: with gloo, the backward of a >2-D all_gather returned wrong gradients
    # (tests/test_ddp.py caught it on SupCon's (N, views, D) features).
    flat = tensor.reshape(tensor.shape[0], -1).contiguous()
    return torch.cat(all_gather(flat), dim=0).reshape(-1, *tensor.shape[1:])


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0 without gradient (queues, keys)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def local_rows(global_batch: int) -> slice:
    """The rows of a gathered batch that belong to this process (equal batch per process)."""
    per_process = global_batch // world_size()
    return slice(rank() * per_process, (rank() + 1) * per_process)


@torch.no_grad()
def shuffle_across_processes(x: torch.Tensor, generator: torch.Generator | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across all processes (MoCo's shuffle-BN); returns (local part, unshuffle).

    Every process draws the same permutation from a generator seeded identically, so no broadcast
    is needed. In one process this is a local permutation.
    """
    gathered = gather_no_grad(x)
    permutation = torch.randperm(gathered.shape[0], generator=generator).to(x.device)
    unshuffle = torch.argsort(permutation)
    return gathered[permutation][local_rows(gathered.shape[0])], unshuffle


@torch.no_grad()
def unshuffle_across_processes(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_across_processes` on the outputs computed from the shuffled batch."""
    gathered = gather_no_grad(x)
    return gathered[unshuffle][local_rows(gathered.shape[0])]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed over ``num_splits`` groups of the batch.

    This is the single-device stand-in for MoCo's shuffle-BN (the approach of the MoCo authors'
    CIFAR demo): with one device there is no other GPU to shuffle keys to, so both encoders
    normalise over small sub-batches and the key batch is shuffled before the key encoder. A query
    and its positive key then never share batch statistics, which closes the leak that shuffle-BN
    exists to close. Sample ``n`` falls in group ``n % num_splits``. In eval mode it is plain BN.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if not self.training or batch % self.num_splits != 0 or batch == self.num_splits:
            return super().forward(x)
        splits = self.num_splits
        running_mean = self.running_mean.repeat(splits)
        running_var = self.running_var.repeat(splits)
        out = F.batch_norm(x.reshape(-1, channels * splits, height, width), running_mean,
                           running_var, self.weight.repeat(splits), self.bias.repeat(splits),
                           True, self.momentum if self.momentum is not None else 0.1, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(splits, channels).mean(dim=0))
            self.running_var.copy_(running_var.view(splits, channels).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return out.view(batch, channels, height, width)


def convert_to_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm2d` (same state)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps,
                                     momentum=child.momentum, affine=child.affine,
                                     track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_to_split_batchnorm(child, num_splits)
    return module


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are computed over the batch of every process (SyncBN).

    torch's ``SyncBatchNorm`` runs on GPUs only; this one reduces the per-channel sums with the
    differentiable ``all_reduce`` of any backend (gloo included), so the same run is correct on
    CPU processes and its equivalence to one process is tested in CI (tests/test_ddp.py). The mean
    and variance are reduced in two passes (mean first, then squared deviations), in float32.
    Outside training, or in one process, it is plain BatchNorm. Works for 1-D to 3-D inputs.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        values = x.float()
        count = torch.tensor(float(values.numel() // values.shape[1]), device=x.device)
        dist.all_reduce(count)
        mean = all_reduce(values.sum(dims)) / count
        centred = values - mean.view(shape)
        variance = all_reduce(centred.square().sum(dims)) / count
        out = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = variance * (count / (count - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every plain BatchNorm (1-D, 2-D, 3-D) in ``module`` by a :class:`GlobalBatchNorm`
    with the same state. ``SplitBatchNorm2d`` (MoCo's single-device shuffle-BN) is kept."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for name, child in module.named_children():
        if isinstance(child, plain) and not isinstance(child, SplitBatchNorm2d):
            synced = GlobalBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine,
                                     track_running_stats=child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced.to(next(child.buffers(), torch.empty(0)).device))
        else:
            convert_to_global_batchnorm(child)
    return module
