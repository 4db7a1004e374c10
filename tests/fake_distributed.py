"""A stand-in for DDP's collectives in one process, shared by the loss tests."""

import torch


class FakeSecondOfTwoProcesses:
    """Rank 1 of 2: the collectives of ``module`` return [rank 0's part, this process's part].

    ``rank_zero_parts`` are what rank 0 would contribute, in the order the loss gathers them;
    when they carry gradient, the keys' gradient back to rank 0's inputs is checked too.
    """

    def __init__(self, monkeypatch, module, rank_zero_parts):
        self.parts = list(rank_zero_parts)
        for name, value in [("rank", lambda: 1), ("world_size", lambda: 2),
                            ("gather_with_grad", self.gather), ("gather_no_grad", self.gather)]:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)

    def gather(self, local):
        return torch.cat([self.parts.pop(0).to(local.dtype), local], dim=0)
