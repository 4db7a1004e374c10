"""Stores of past embeddings: MoCo's queue of negative keys.

Everything is a persistent buffer, so it is in ``state_dict`` and checkpointed (lightly's memory
bank once was not, and resumed runs silently restarted from an empty bank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Queue(nn.Module):
    """A first-in first-out queue of ``size`` keys of dimension ``dim`` (He et al. 2020).

    Starts as random unit vectors, as the MoCo reference does, so the first batches already have
    ``size`` negatives. ``push`` overwrites the oldest keys and wraps around, so the size need not
    be a multiple of the batch.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def snapshot(self) -> torch.Tensor:
        """The current keys, detached and copied: safe to use in a graph before the next push."""
        return self.keys.detach().clone()

    @torch.no_grad()
    def push(self, new_keys: torch.Tensor) -> None:
        new_keys = new_keys.detach().to(self.keys.dtype)[-self.size:]
        positions = (self.pointer + torch.arange(new_keys.shape[0], device=self.keys.device)
                     ) % self.size
        self.keys[positions] = new_keys
        self.pointer.copy_((self.pointer + new_keys.shape[0]) % self.size)
