"""Semi-supervised evaluation: fine-tune the whole network on a class-balanced share of the labels.

The protocol of SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", Section 6 and Appendix B.5): a linear head on the backbone, both trained end to
end with SGD and Nesterov momentum 0.9, no weight decay, no warm-up, learning rate
0.05 x BatchSize / 256, random resized crop with a left-right flip as the only augmentation;
60 epochs with 1% of the labels, 30 with 10%. B.5 gives no figure for 100%: we use 30, as for
every fraction above 1%. The learning rate is chosen from a grid (per 256 images, scaled linearly
to the batch) on the validation split; the test split is only reported.

The network under the linear head is the method's ``finetune_encoder(fraction)``: the backbone,
or for SimCLR v2 the backbone and the first projection-head layer (Chen et al. 2020b, Section 2).
The best classifier can be saved (:func:`save_classifier`, ``selfsup eval finetune --out``) and
read back (:func:`load_classifier`): it is the teacher of ``selfsup distill``, whose training
loop is this module's :func:`fit_classifier` too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from selfsup.augment import (HorizontalFlip, Normalize, Pipeline, RandomResizedCrop,
                             ViewGenerator, ViewGroup)
from selfsup.config import EvalConfig
from selfsup.data import UNLABELED, DataInfo, DataSplits, SkipLog, build_loader
from selfsup.errors import CheckpointError, ConfigError, DataError
from selfsup.evaluate.features import extract_features
from selfsup.optim import WarmupCosine
from selfsup.precision import Precision, resolve_precision

# Label fractions up to this one get the paper's 1% schedule.
_ONE_PERCENT = 0.01
_EPOCHS_FEW_LABELS, _EPOCHS_MORE_LABELS = 60, 30
_MOMENTUM = 0.9
# SimCLR's supervised head: normal(0, 0.01) weights and a zero bias.
_HEAD_INIT_STD = 0.01


# A training objective: (model, augmented view, labels, sample index) -> loss.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FinetuneResult:
    val_top1: float
    test_top1: float
    lr: float  # the chosen learning rate per 256 images
    num_labels: int
    epochs: int
    # The chosen classifier: encoder + linear head, in eval mode (save it with save_classifier).
    model: nn.Module | None = field(default=None, repr=False, compare=False)


def check_label_fraction(fraction: float, name: str = "label fraction") -> float:
    """``fraction`` if it lies in (0, 1]; otherwise a ConfigError naming ``name`` and the value."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1] (e.g. 0.01, 0.1, 1.0), got {fraction!r}")
    return float(fraction)


def paper_epochs(fraction: float) -> int:
    """SimCLR's fine-tuning length: 60 epochs for 1% of the labels (or fewer), else 30."""
    return _EPOCHS_FEW_LABELS if fraction <= _ONE_PERCENT else _EPOCHS_MORE_LABELS


def balanced_label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of ``max(1, round(fraction * n_c))`` labelled samples of every class c.

    Each class's samples are shuffled once by a generator seeded with ``seed`` (classes in
    ascending order) and the subset takes a prefix, so the draws are nested: with one seed, the
    1% subset lies inside the 10% one. Unlabeled samples (label -1) are never chosen.
    """
    check_label_fraction(fraction)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels[labels != UNLABELED]):
        members = np.flatnonzero(labels == cls)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.permutation(members)[:count])
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def finetune_augmentation(info: DataInfo) -> ViewGenerator:
    """SimCLR's fine-tuning views (Appendix B.5): random resized crop, scale (0.08, 1), and a
    left-right flip, then the dataset's normalisation."""
    pipeline = Pipeline([RandomResizedCrop(info.image_size, scale=(0.08, 1.0)),
                         HorizontalFlip(p=0.5), Normalize(info.mean, info.std)])
    return ViewGenerator([ViewGroup(pipeline, 1)])


def _feature_dim(backbone: nn.Module, image_size: int) -> int:
    was_training = backbone.training
    backbone.eval()
    parameter = next(backbone.parameters())
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size, device=parameter.device)
        dim = backbone(probe).shape[1]
    backbone.train(was_training)
    return int(dim)


def _top1(model: nn.Module, dataset: Dataset, info: DataInfo, batch_size: int,
          device: torch.device, num_workers: int, skips: SkipLog | None) -> float:
    """Top-1 of ``model`` (eval mode: BN uses its running statistics) on the labelled samples."""
    logits, labels = extract_features(model, dataset, info, batch_size=batch_size, device=device,
                                      num_workers=num_workers, skips=skips)
    labelled = labels != UNLABELED
    if not labelled.any():
        raise DataError(f"{info.name}: an evaluation split has no labelled sample to score")
    return (logits[labelled].argmax(1) == labels[labelled]).float().mean().item()


def linear_classifier(encoder: nn.Module, info: DataInfo,
                      generator: torch.Generator) -> nn.Sequential:
    """``encoder`` + a linear head to ``info.num_classes`` initialised as SimCLR's supervised head
    (normal weights of std 0.01 drawn from ``generator``, zero bias)."""
    head = nn.Linear(_feature_dim(encoder, info.image_size), info.num_classes)
    with torch.no_grad():
        nn.init.normal_(head.weight, std=_HEAD_INIT_STD, generator=generator)
        head.bias.zero_()
    return nn.Sequential(encoder, head)


def cross_entropy_objective(model: nn.Module, view: torch.Tensor, labels: torch.Tensor,
                            index: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy of the model's logits against the labels."""
    return F.cross_entropy(model(view).float(), labels)


def fit_classifier(model: nn.Module, dataset: Dataset, info: DataInfo,
                   make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], epochs: int,
                   batch_size: int, objective: Objective, generator: torch.Generator,
                   seed: int = 0, warmup_steps: int = 0, device: torch.device | str = "cpu",
                   precision: Precision = "32", num_workers: int = 0,
                   skips: SkipLog | None = None) -> nn.Module:
    """Train ``model`` (in place) on ``dataset`` with ``objective``, for ``epochs``: the one
    classifier-training loop of fine-tuning and distillation.

    Views: SimCLR's fine-tuning augmentation (:func:`finetune_augmentation`), drawn from
    ``generator``; data order from ``seed``; the optimizer's learning rate follows a linear
    warm-up over ``warmup_steps`` then a cosine decay to 0 at the last step.
    """
    device = torch.device(device)
    bf16 = resolve_precision(precision, device.type) == "bf16"
    model = model.to(device).train()
    augment = finetune_augmentation(info)
    loader = build_loader(dataset, batch_size, shuffle=True, drop_last=False,
                          num_workers=num_workers, seed=seed, skips=skips)
    optimizer = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps, epochs * math.ceil(len(dataset) / batch_size)))
    for _ in range(epochs):
        for images, labels, index in loader:
            (view,) = augment(images.to(device, non_blocking=True), generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = objective(model, view, labels.to(device), index.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


def train_classifier(backbone: nn.Module, dataset: Dataset, info: DataInfo, lr: float,
                     epochs: int, batch_size: int, seed: int = 0,
                     device: torch.device | str = "cpu", precision: Precision = "32",
                     num_workers: int = 0, skips: SkipLog | None = None) -> nn.Sequential:
    """``backbone`` + a linear head trained end to end on ``dataset`` (in place: pass a copy).

    ``lr`` is the learning rate per 256 images. The data order, the views and the head's
    initialisation all come from ``seed``, so on the CPU a second call gives the same weights.
    """
    generator = torch.Generator().manual_seed(seed)
    model = linear_classifier(backbone, info, generator)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=lr * batch_size / 256,  # noqa: E731
                                        momentum=_MOMENTUM, nesterov=True, weight_decay=0.0)
    return fit_classifier(model, dataset, info, sgd, epochs, batch_size, cross_entropy_objective,
                          generator, seed=seed, device=device, precision=precision,
                          num_workers=num_workers, skips=skips)


def finetune(backbone: nn.Module, splits: DataSplits, fraction: float,
             lrs: Sequence[float] | None = None, epochs: int | None = None,
             batch_size: int = 256, seed: int = 0, device: torch.device | str | None = None,
             precision: Precision = "32", eval_batch_size: int = 512,
             num_workers: int = 0, skips: SkipLog | None = None) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` on ``fraction`` of the train split's labels (class
    balanced, drawn with ``seed``) once per learning rate in ``lrs`` (per 256 images); keep the
    one with the best validation top-1 and report its test top-1. ``backbone`` is not changed.

    ``lrs`` None is ``EvalConfig().finetune_lrs``; ``epochs`` None is the paper's length for
    ``fraction`` (:func:`paper_epochs`); the batch is ``batch_size``, or the number of labelled
    samples if smaller. Deterministic on the CPU for a given ``seed``.
    """
    info = splits.info
    positions = balanced_label_subset(splits.train.labels, fraction, seed)
    if info.num_classes < 2 or len(positions) == 0:
        raise DataError(f"{info.name}: fine-tuning needs a train split labelled with at least "
                        f"two classes (it has {info.num_classes})")
    lrs = EvalConfig().finetune_lrs if lrs is None else lrs
    if not lrs:
        raise ConfigError("eval.finetune_lrs: the learning-rate grid is empty")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labelled = splits.train.subset(positions)
    epochs = paper_epochs(fraction) if epochs is None else epochs
    batch = min(batch_size, len(labelled))
    best: tuple[float, nn.Module, float] | None = None
    for lr in lrs:
        model = train_classifier(copy.deepcopy(backbone), labelled, info, lr, epochs, batch,
                                 seed=seed, device=device, precision=precision,
                                 num_workers=num_workers, skips=skips)
        score = _top1(model, splits.val, info, eval_batch_size, device, num_workers, skips)
        if best is None or score > best[0]:
            best = (score, model, lr)
    assert best is not None
    score, model, lr = best
    test_top1 = _top1(model, splits.test, info, eval_batch_size, device, num_workers, skips)
    return FinetuneResult(val_top1=score, test_top1=test_top1, lr=lr,
                          num_labels=len(positions), epochs=epochs, model=model.eval())


# ---- classifier files: the fine-tuned teacher of ``selfsup distill``, and its students ---------

CLASSIFIER_FORMAT = "selfsup-classifier"
CLASSIFIER_FORMAT_VERSION = 1
_CLASSIFIER_KEYS = ("encoder", "config", "data_info", "labels", "state_dict")


def save_classifier(path: str | Path, model: nn.Module, *, encoder: dict[str, Any],
                    config: dict[str, Any], data_info: dict[str, Any],
                    labels: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write a trained classifier (encoder + linear head) that :func:`load_classifier` rebuilds.

    ``encoder`` says how to rebuild the network before the head: ``{"kind": "finetune_encoder",
    "label_fraction": f}`` (the pretraining method of ``config``, its ``finetune_encoder(f)``) or
    ``{"kind": "backbone", "name": ..., "width": ..., "cifar_stem": ...}`` (a plain backbone, as
    a distilled student). ``config``: the pretraining run's config (data source, split seed and
    fraction, batch). ``labels``: ``{"fraction", "seed", "count"}`` of the labelled subset used.
    The file holds plain data only (read back with ``weights_only=True``) and is written
    atomically.
    """
    from selfsup.checkpoint import atomic_torch_save

    record = {"format": CLASSIFIER_FORMAT, "format_version": CLASSIFIER_FORMAT_VERSION,
              "encoder": dict(encoder), "config": config, "data_info": data_info,
              "labels": dict(labels), "metrics": dict(metrics),
              "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    path = Path(path)
    atomic_torch_save(record, path)
    return path


def build_classifier(record: dict[str, Any], source: str = "classifier") -> nn.Sequential:
    """The untrained network a classifier record describes (encoder + linear head); errors
    name ``source`` and the key at fault."""
    from selfsup.backbones import build_backbone
    from selfsup.config import Config
    from selfsup.train import build_pretraining_method

    encoder_spec, info = record["encoder"], record["data_info"]
    try:
        kind = encoder_spec["kind"]
        num_classes, image_size = int(info["num_classes"]), int(info["image_size"])
        if kind == "finetune_encoder":
            method = build_pretraining_method(Config(**record["config"]), info)
            encoder = method.finetune_encoder(float(encoder_spec["label_fraction"]))
        elif kind == "backbone":
            encoder, _ = build_backbone(encoder_spec["name"],
                                        cifar_stem=bool(encoder_spec["cifar_stem"]),
                                        width=float(encoder_spec["width"]))
        else:
            raise CheckpointError(f"{source}: key 'encoder.kind' is {kind!r}; expected "
                                  "'finetune_encoder' or 'backbone'")
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        if isinstance(error, CheckpointError):
            raise
        what = f"key {error.args[0]!r} missing" if isinstance(error, KeyError) else str(error)
        raise CheckpointError(f"{source}: cannot rebuild the classifier from its 'encoder', "
                              f"'config' and 'data_info' keys ({what.splitlines()[0]})") from None
    head = nn.Linear(_feature_dim(encoder, image_size), num_classes)
    return nn.Sequential(encoder, head)


def load_classifier(path: str | Path) -> tuple[nn.Sequential, dict[str, Any]]:
    """Read a classifier written by :func:`save_classifier` (``selfsup eval finetune --out`` or
    ``selfsup distill``); returns ``(model in eval mode, record)``.

    The file is loaded with ``weights_only=True``. A training checkpoint, another file or one
    with a missing key is a :class:`CheckpointError` naming the file and what is wrong.
    """
    from selfsup.checkpoint import load_checkpoint_file

    record = load_checkpoint_file(path)
    if record.get("format") != CLASSIFIER_FORMAT:
        if "hyper_parameters" in record and "state_dict" in record:
            raise CheckpointError(
                f"{path}: a training checkpoint, not a fine-tuned classifier; make one with "
                f"selfsup eval finetune --checkpoint {path} --labels 10% --out FILE.pt")
        raise CheckpointError(f"{path}: not a fine-tuned classifier (key 'format' is "
                              f"{record.get('format')!r}, expected {CLASSIFIER_FORMAT!r})")
    missing = [key for key in _CLASSIFIER_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"{path}: classifier file lacks key(s) {', '.join(missing)}")
    model = build_classifier(record, str(path))
    try:
        model.load_state_dict(record["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: key 'state_dict' does not fit the classifier its "
                              f"'encoder' key describes: {str(error).splitlines()[0]}") from None
    return model.eval(), record
