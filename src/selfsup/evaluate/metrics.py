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


# Below this effective rank the embeddings lie on a few lines: SimSiam without its stop-gradient
# falls under 4 within 40 steps (tests/test_noncontrastive.py), SwAV's uniform codes and
# InstDisc's NCE collapse reach 2 to 3 (benchmarks/RESULTS.md), while the runs measured without a
# collapse kept 9 or more (CPC's pooled patch features the lowest).
COLLAPSED_EFFECTIVE_RANK = 4.0
# The rank of a batch of N embeddings of width D is at most min(N, D); under 32 a healthy batch
# could be under the bound too, so no warning is given.
MIN_RANK_CEILING = 32


def collapse_warning(effective_ranks: list[float], rank_ceiling: int, epoch: int) -> str | None:
    """The warning for an epoch whose embeddings collapsed, or None: the epoch's logged
    effective ranks (of batches whose rank is at most ``rank_ceiling``) average under
    :data:`COLLAPSED_EFFECTIVE_RANK`. ``epoch`` counts from 0, as the logs' epoch column does."""
    if not effective_ranks or rank_ceiling < MIN_RANK_CEILING:
        return None
    mean_rank = sum(effective_ranks) / len(effective_ranks)
    if mean_rank >= COLLAPSED_EFFECTIVE_RANK:
        return None
    return (f"epoch {epoch}: the embeddings look collapsed: their effective rank averaged "
            f"{mean_rank:.1f} over the epoch, out of at most {rank_ceiling} (under "
            f"{COLLAPSED_EFFECTIVE_RANK:g} the batch lies on a few lines), so the features "
            f"carry little of the images; train/effective_rank and train/embedding_std in the "
            f"run's logs show when it happened")
