"""Evaluation of encoders: weighted kNN and a linear probe on frozen features, and fine-tuning on
a share of the labels, each beside a random-init baseline of the same network; and the
self-distillation of a fine-tuned classifier into a student (SimCLR v2's third stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.config import EvalConfig
from selfsup.data import DataSplits, SkipLog
from selfsup.evaluate.distill import DistillResult, distill
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.finetune import (FinetuneResult, balanced_label_subset,
                                       check_label_fraction, finetune, load_classifier,
                                       save_classifier)
from selfsup.evaluate.knn import knn_predict, knn_top1
from selfsup.evaluate.linear import LinearProbeResult, linear_probe
from selfsup.precision import Precision

__all__ = ["evaluate_backbone", "evaluate_knn_bank", "extract_features", "knn_predict", "knn_top1", "linear_probe",
           "LinearProbeResult", "finetune", "finetune_backbone", "FinetuneResult",
           "balanced_label_subset", "check_label_fraction", "distill", "DistillResult",
           "save_classifier", "load_classifier"]


def evaluate_knn_bank(bank: torch.Tensor, encoder: nn.Module, splits: DataSplits,
                      config: EvalConfig, num_workers: int = 0, skips: SkipLog | None = None
                      ) -> dict[str, float]:
    """kNN top-1 against a method's bank of training-split features (``Method.knn_bank``): the
    queries are embedded by ``encoder``; the bank's labels are the training split's, row by
    row; unlabeled rows are left out."""
    info = splits.info
    labels = torch.as_tensor(splits.train.labels, dtype=torch.long)
    if len(labels) != bank.shape[0]:
        raise ValueError(f"the bank has {bank.shape[0]} rows for {len(labels)} training samples")
    labeled = labels >= 0
    reference = bank.detach().float().cpu()[labeled]
    results: dict[str, float] = {}
    for name, dataset in (("knn_bank_top1", splits.test), ("knn_bank_val_top1", splits.val)):
        queries, query_labels = extract_features(encoder, dataset, info,
                                                 batch_size=config.batch_size,
                                                 num_workers=num_workers, skips=skips)
        results[name] = knn_top1(reference, labels[labeled], queries, query_labels,
                                 info.num_classes, config.knn_k, config.knn_temperature)
    return results


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
                      fraction: float, seed: int = 0, precision: Precision = "32",
                      suffix: str = "", num_workers: int = 0,
                      skips: SkipLog | None = None, classifier_out: str | Path | None = None,
                      pretraining: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune on ``fraction`` of the labels (:func:`finetune`, SimCLR Appendix B.5) and
    return ``{metric + suffix: value}``: test and validation top-1 and the chosen learning rate,
    with the label count, fraction and epochs (unsuffixed: the baseline shares them).

    ``classifier_out``: also write the chosen classifier there (:func:`save_classifier`; the
    teacher ``selfsup distill`` reads). ``backbone`` must then be ``finetune_encoder(fraction)``
    of the method that ``pretraining["config"]`` (with ``pretraining["data_info"]``) builds.
    """
    result = finetune(backbone, splits, fraction, config.finetune_lrs, config.finetune_epochs,
                      config.finetune_batch_size, seed=seed, precision=precision,
                      eval_batch_size=config.batch_size, num_workers=num_workers, skips=skips)
    results: dict[str, Any] = {"finetune_top1" + suffix: result.test_top1,
                               "finetune_val_top1" + suffix: result.val_top1,
                               "finetune_lr" + suffix: result.lr}
    if not suffix:
        results.update(finetune_labels=result.num_labels, finetune_fraction=fraction,
                       finetune_epochs=result.epochs)
    if classifier_out is not None:
        if pretraining is None:
            raise ValueError("classifier_out needs pretraining={'config': ..., 'data_info': ...}")
        path = save_classifier(
            classifier_out, result.model,
            encoder={"kind": "finetune_encoder", "label_fraction": fraction},
            config=pretraining["config"], data_info=pretraining["data_info"],
            labels={"fraction": fraction, "seed": seed, "count": result.num_labels},
            metrics={"val_top1": result.val_top1, "test_top1": result.test_top1,
                     "lr": result.lr, "epochs": result.epochs})
        results["classifier" + suffix] = str(path)
    return results
