"""Evaluation of frozen encoders: weighted kNN and a linear probe, each beside a random-init
baseline of the same network."""

from __future__ import annotations

from typing import Any

from torch import nn

from selfsup.config import EvalConfig
from selfsup.data import DataSplits, SkipLog
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_predict, knn_top1
from selfsup.evaluate.linear import LinearProbeResult, linear_probe

__all__ = ["evaluate_backbone", "extract_features", "knn_predict", "knn_top1", "linear_probe",
           "LinearProbeResult"]


def evaluate_backbone(backbone: nn.Module, splits: DataSplits, config: EvalConfig,
                      protocols: list[str], seed: int = 0, suffix: str = "",
                      num_workers: int = 0, skips: SkipLog | None = None) -> dict[str, Any]:
    """Run the requested protocols (``knn``, ``linear``) and return ``{metric + suffix: value}``.

    The kNN bank and the probe's training set are the train split; the validation split chooses
    the probe's hyper-parameters; the test split is only reported. ``skips``: see
    :func:`extract_features`.
    """
    info = splits.info
    extract = lambda dataset: extract_features(backbone, dataset, info,  # noqa: E731
                                               batch_size=config.batch_size,
                                               num_workers=num_workers, skips=skips)
    train, val, test = extract(splits.train), extract(splits.val), extract(splits.test)
    results: dict[str, Any] = {}
    if "knn" in protocols:
        results["knn_top1" + suffix] = knn_top1(*train, *test, info.num_classes, config.knn_k,
                                               config.knn_temperature)
        results["knn_val_top1" + suffix] = knn_top1(*train, *val, info.num_classes,
                                                   config.knn_k, config.knn_temperature)
    if "linear" in protocols:
        probe = linear_probe(train, val, test, info.num_classes, config.linear_lrs,
                             config.linear_weight_decays, steps=config.linear_steps, seed=seed)
        results["linear_top1" + suffix] = probe.test_top1
        results["linear_val_top1" + suffix] = probe.val_top1
        if not suffix:
            results["linear_lr"] = probe.lr
            results["linear_weight_decay"] = probe.weight_decay
    return results
