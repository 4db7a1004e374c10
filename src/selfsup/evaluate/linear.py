"""Linear probe on frozen features (the protocol of Zhang et al. 2016 / Chen et al. 2020).

Features are extracted once; a softmax classifier is trained on the train split for every
(learning rate, weight decay) in a grid, the pair with the best validation top-1 is kept, and its
test top-1 is reported beside its validation top-1. The test set never chooses anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LinearProbeResult:
    val_top1: float
    test_top1: float
    lr: float
    weight_decay: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _top1(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (classifier(features).argmax(1) == labels).float().mean().item()


def train_linear_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            lr: float, weight_decay: float, steps: int = 300,
                            batch_size: int = 1024, seed: int = 0) -> nn.Linear:
    """Mini-batch AdamW with cosine decay on standardised features (fast, deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        nn.init.normal_(classifier.weight, std=0.01, generator=generator)
        classifier.bias.zero_()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        index = torch.randint(0, features.shape[0], (min(batch_size, features.shape[0]),),
                              generator=generator)
        loss = F.cross_entropy(classifier(features[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 lrs: list[float], weight_decays: list[float], steps: int = 300,
                 seed: int = 0) -> LinearProbeResult:
    """Choose (lr, weight decay) on ``val``; report that classifier's ``val`` and ``test`` top-1."""
    mean = train[0].mean(0, keepdim=True)
    std = train[0].std(0, keepdim=True).clamp_min(1e-6)
    standardize = lambda x: (x.float() - mean) / std  # noqa: E731
    train_x, val_x, test_x = standardize(train[0]), standardize(val[0]), standardize(test[0])
    best: tuple[float, nn.Linear, float, float] | None = None
    for lr in lrs:
        for weight_decay in weight_decays:
            classifier = train_linear_classifier(train_x, train[1], num_classes, lr, weight_decay,
                                                 steps=steps, seed=seed)
            score = _top1(classifier, val_x, val[1])
            if best is None or score > best[0]:
                best = (score, classifier, lr, weight_decay)
    assert best is not None, "the hyper-parameter grid is empty"
    score, classifier, lr, weight_decay = best
    return LinearProbeResult(val_top1=score, test_top1=_top1(classifier, test_x, test[1]),
                             lr=lr, weight_decay=weight_decay)
