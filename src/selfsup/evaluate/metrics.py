"""Representation-health metrics logged during training, so a collapsed run is visible.

- ``embedding_std``: the mean per-dimension standard deviation of L2-normalised embeddings
  (Chen & He 2021, SimSiam, Section 4.1): about 1/sqrt(d) when healthy, 0 when collapsed.
- ``effective_rank``: exp of the entropy of the normalised singular values (Roy & Vetterli 2007)
  of the uncentred embedding matrix, as RankMe does (Garrido et al. 2023): between 1 (every
  embedding on one line, e.g. all equal) and d.
- ``alignment`` / ``uniformity`` of Wang & Isola 2020, between the first two views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses import alignment, uniformity


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    return F.normalize(z.float(), dim=1).std(dim=0).mean().item()


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> float:
    singular_values = torch.linalg.svdvals(z.float())
    p = singular_values / singular_values.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return torch.exp(entropy).item()


@torch.no_grad()
def collapse_metrics(embeddings: list[torch.Tensor]) -> dict[str, float]:
    """Metrics of the per-view embeddings a method returns (each (N, D))."""
    first = embeddings[0].detach()
    metrics = {"embedding_std": embedding_std(first), "effective_rank": effective_rank(first)}
    if first.shape[0] >= 2:
        metrics["uniformity"] = uniformity(first.float()).item()
    if len(embeddings) >= 2 and embeddings[1].shape == first.shape:
        metrics["alignment"] = alignment(first.float(), embeddings[1].detach().float()).item()
    return metrics
