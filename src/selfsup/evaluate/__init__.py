"""Evaluation of encoders: weighted kNN and a linear probe on frozen features, and fine-tuning on
a share of the labels, each beside a random-init baseline of the same network."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from selfsup.config import EvalConfig
from selfsup.data import DataSplits, SkipLog
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.finetune import (FinetuneResult, balanced_label_subset,
                                       check_label_fraction, finetune)
from selfsup.evaluate.knn import knn_predict, knn_top1
from selfsup.evaluate.linear import LinearProbeResult, linear_probe

__all__ = ["evaluate_backbone", "extract_features", "knn_predict", "knn_top1", "linear_probe",
           "LinearProbeResult", "finetune", "finetune_backbone", "FinetuneResult",
           "balanced_label_subset", "check_label_fraction"]


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


def finetune_backbone(backbone: nn.Module, splits: DataSplits, config: EvalConfig,
                      fraction: float, seed: int = 0, precision: Literal["32", "bf16"] = "32",
                      suffix: str = "", num_workers: int = 0,
                      skips: SkipLog | None = None) -> dict[str, Any]:
    """Fine-tune on ``fraction`` of the labels (:func:`finetune`, SimCLR Appendix B.5) and
    return ``{metric + suffix: value}``: test and validation top-1 and the chosen learning rate,
    with the label count, fraction and epochs (unsuffixed: the baseline shares them)."""
    result = finetune(backbone, splits, fraction, config.finetune_lrs, config.finetune_epochs,
                      config.finetune_batch_size, seed=seed, precision=precision,
                      eval_batch_size=config.batch_size, num_workers=num_workers, skips=skips)
    results: dict[str, Any] = {"finetune_top1" + suffix: result.test_top1,
                               "finetune_val_top1" + suffix: result.val_top1,
                               "finetune_lr" + suffix: result.lr}
    if not suffix:
        results.update(finetune_labels=result.num_labels, finetune_fraction=fraction,
                       finetune_epochs=result.epochs)
    return results
