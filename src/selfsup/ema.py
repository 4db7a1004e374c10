"""Momentum (exponential moving average) copies of a network and their momentum schedules."""

from __future__ import annotations

import copy

import torch
from torch import nn

from selfsup.optim import cosine_between


def cosine_momentum(base: float, progress: float, final: float = 1.0) -> float:
    """BYOL's schedule (Grill et al. 2020): ``1 - (1 - base) * (cos(pi * progress) + 1) / 2``."""
    return cosine_between(base, final, progress)


class MomentumCopy(nn.Module):
    """A frozen copy of ``module`` updated as ``theta_k <- m * theta_k + (1 - m) * theta_q``.

    Only parameters move by EMA; buffers (BatchNorm running statistics) are the copy's own, as in
    the MoCo and BYOL references, because the copy runs in training mode on its own inputs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        own = list(self.module.parameters())
        source = [p.detach() for p in online.parameters()]
        torch._foreach_mul_(own, momentum)
        torch._foreach_add_(own, source, alpha=1.0 - momentum)
