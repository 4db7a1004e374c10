"""Run by tests/test_ddp.py: two CPU processes under Lightning's DDP (gloo). Each process takes
half of a fixed batch and computes a loss with negatives gathered across processes; after DDP's
gradient averaging, rank 0 writes the loss of each rank and the gradients to OUT (argv[1]).
The same is done for a network with GlobalBatchNorm (the SyncBN option). It also runs one MoCo v2
step with a BatchNorm encoder (shuffle-BN across the processes) and records each rank's queue."""

import sys

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from selfsup.distributed import convert_to_global_batchnorm
from selfsup.losses import nt_xent, supcon
from selfsup.methods import Batch, MethodContext, build_method

N, D = 8, 6


def fixed_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"x1": torch.randn(N, D, generator=generator), "x2": torch.randn(N, D, generator=generator),
            "labels": torch.randint(0, 3, (N,), generator=generator)}


def encoder() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(D, 5)


def batchnorm_encoder() -> nn.Module:
    """Linear + BatchNorm (made global by ``convert_to_global_batchnorm`` in the DDP run)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 5))


def losses(model: nn.Module, x1, x2, labels, gather: bool) -> dict[str, torch.Tensor]:
    z1, z2 = model(x1), model(x2)
    return {"nt_xent": nt_xent(z1, z2, 0.5, gather_distributed=gather),
            "supcon": supcon(torch.stack([z1, z2], 1), labels, 0.1, gather_distributed=gather),
            "global_batchnorm": nt_xent(z1, z2, 0.5, gather_distributed=gather)}


class Probe(L.LightningModule):
    def __init__(self, loss_name: str, out: str) -> None:
        super().__init__()
        self.loss_name, self.out = loss_name, out
        self.encoder = (convert_to_global_batchnorm(batchnorm_encoder())
                        if loss_name == "global_batchnorm" else encoder())

    def training_step(self, batch, batch_idx):
        data = fixed_batch()
        rows = slice(self.global_rank * N // 2, (self.global_rank + 1) * N // 2)
        loss = losses(self.encoder, data["x1"][rows], data["x2"][rows], data["labels"][rows],
                      gather=True)[self.loss_name]
        self.rank_loss = loss.detach()
        return loss

    def on_after_backward(self) -> None:
        rank_losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(rank_losses, self.rank_loss)
        if self.global_rank == 0:
            torch.save({"losses": torch.stack(rank_losses),
                        "grads": {n: p.grad.clone() for n, p in self.encoder.named_parameters()},
                        "buffers": {n: b.clone() for n, b in self.encoder.named_buffers()}},
                       f"{self.out}/{self.loss_name}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)


def moco() -> nn.Module:
    """MoCo v2 on a BatchNorm encoder with plain BN (bn_splits=1): shuffle-BN is then the only
    thing keeping a query and its key from sharing batch statistics."""
    torch.manual_seed(2)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8))
    return build_method("mocov2", backbone, MethodContext(8, 16, 2, 4),
                        {"queue_size": 16, "bn_splits": 1})


def moco_images(rank: int) -> torch.Tensor:
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(10 + rank))


MOCO_SEED = 5  # the step generator every process shares: it draws the global shuffle


def moco_queue(out: str) -> None:
    model = moco()
    rank = dist.get_rank()
    images = moco_images(rank)
    model.training_step(Batch([images, images], None, torch.arange(4),
                              torch.Generator().manual_seed(MOCO_SEED)))
    queues = [torch.zeros_like(model.queue.keys) for _ in range(2)]
    dist.all_gather(queues, model.queue.keys)
    if rank == 0:
        torch.save({"queues": queues, "pointer": model.queue.pointer.clone()}, f"{out}/moco.pt")


if __name__ == "__main__":
    out = sys.argv[1]
    for name in ("nt_xent", "supcon", "global_batchnorm"):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(Probe(name, out))
    moco_queue(out)
