"""Frozen-feature extraction: clean (un-augmented) images through the backbone in eval mode."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from selfsup.augment import build_view_generator
from selfsup.data import DataInfo, SkipLog, build_loader


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, info: DataInfo,
                     batch_size: int = 512, device: torch.device | str | None = None,
                     num_workers: int = 0, skips: SkipLog | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,) int64) for every sample, in dataset order;
    with ``skips`` (``data.skip_bad``), samples that cannot be decoded are left out and recorded there."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    normalize = build_view_generator("eval", info.image_size, info.mean, info.std, num_views=1)
    was_training = backbone.training
    backbone.eval().to(device)
    features, labels = [], []
    loader = build_loader(dataset, batch_size, shuffle=False, drop_last=False,
                          num_workers=num_workers, skips=skips)
    for images, batch_labels, _ in loader:
        (view,) = normalize(images.to(device), None)
        features.append(backbone(view).float().cpu())
        labels.append(batch_labels)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
