"""Stores of past embeddings: MoCo's queue of negative keys and InstDisc's memory bank.

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


class MemoryBank(nn.Module):
    """One L2-normalised vector per training sample, indexed by sample index (Wu et al. 2018,
    "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", Section 3.2).

    Starts as random unit vectors (uniform on the sphere), which serve as noise until each row is
    first written. ``update`` moves only the rows of the given indices:
    ``v_i <- normalise(m * v_i + (1 - m) * f_i)`` (m = 0.5 in the InstDisc code; m = 0 replaces
    the entry, as the paper's text describes). A row's first write replaces it whatever ``m``: its
    random start is not a feature of the sample, and mixing it in would keep half of a random
    vector as the sample's positive for a whole further epoch. ``written`` records which rows
    hold a feature. ``features`` is the bank itself; both are persistent buffers: checkpointed,
    and kNN evaluation can read the bank.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("written", torch.zeros(size, dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def snapshot(self) -> torch.Tensor:
        """The whole bank, detached and copied: safe to use in a graph before ``update``."""
        return self.features.detach().clone()

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """The entries at ``index``, detached copies (safe to use in a graph before ``update``)."""
        return self.features[index.to(self.features.device)].detach()

    def is_written(self, index: torch.Tensor) -> torch.Tensor:
        """Whether each entry at ``index`` holds a feature (False: still its random start)."""
        return self.written[index.to(self.written.device)]  # indexing by a tensor copies

    @torch.no_grad()
    def update(self, index: torch.Tensor, new_features: torch.Tensor, momentum: float) -> None:
        index = index.to(self.features.device)
        kept = momentum * self.written[index].to(self.features.dtype).unsqueeze(1)
        mixed = kept * self.features[index] + (1.0 - kept) * new_features.detach().to(
            self.features.dtype)
        self.features[index] = F.normalize(mixed, dim=1)
        self.written[index] = True
