"""Self-distillation of a fine-tuned classifier into a student on the unlabeled training images:
stage 3 of SimCLR v2 (Chen, Kornblith, Swersky, Norouzi & Hinton 2020, "Big Self-Supervised
Models are Strong Semi-Supervised Learners", NeurIPS, Section 2 and Section 4).

The fine-tuned network is the teacher, fixed (eval mode, no gradient). The student, by default
a fresh network of the teacher's architecture without the projection head (self-distillation;
any backbone may be chosen: big-to-small distillation), is trained from random init on every
training image, labels unused, to match the teacher's softened predictions on the same views
(eq. 2, :func:`selfsup.losses.distillation`)::

    L = - alpha * sum_{x in D} sum_y P^T(y|x; t) log P^S(y|x; t)
        - (1 - alpha) * sum_{(x, y) in D^L} log P^S(y|x)                  (eq. 3)

``alpha = 1`` (the default) is the paper's default: distillation on unlabeled examples only;
``alpha < 1`` adds the cross-entropy on the labelled subset the teacher was fine-tuned on (each
batch sums both terms over its images and divides by the batch size, so an epoch weighs them as
eq. 3 does). Settings of Section 4: t = 0.1 for self-distillation, 1.0 for a student of another
architecture; the pretraining optimizer (LARS, momentum 0.9, lr 0.1 x sqrt(batch) = 1.6 per 256
images with square-root scaling, weight decay 1e-4, linear warm-up over 5% of the steps then
cosine decay), the pretraining batch, 400 epochs, and only random crops and flips as views.

The training loop is fine-tuning's (:func:`selfsup.evaluate.finetune.fit_classifier`). The
learning rate is chosen on the validation split from a grid around the paper's; the test top-1 of
that student is reported, beside the teacher's and the share of test images on which student and
teacher agree.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from selfsup.config import OptimConfig
from selfsup.data import DataInfo, DataSplits, SkipLog
from selfsup.errors import ConfigError, DataError
from selfsup.evaluate.finetune import (_top1, balanced_label_subset, fit_classifier,
                                       linear_classifier, load_classifier, save_classifier)
from selfsup.losses import distillation
from selfsup.optim import build_optimizer
from selfsup.precision import Precision

# Section 4 of the paper.
SELF_DISTILLATION_TEMPERATURE = 0.1
BIG_TO_SMALL_TEMPERATURE = 1.0
PAPER_EPOCHS = 400
PAPER_BATCH_SIZE = 4096
PAPER_LR = 1.6  # per 256 images, square-root scaling: 0.1 x sqrt(batch)
WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.05
# The grid the validation split chooses from, around the paper's learning rate.
DEFAULT_LRS = (0.8, 1.6, 3.2)
STUDENT_FILE = "student.pt"
RESULTS_FILE = "results.json"


@dataclass
class DistillResult:
    val_top1: float
    test_top1: float
    lr: float  # the chosen learning rate per 256 images (square-root scaled to the batch)
    epochs: int
    batch_size: int
    temperature: float
    alpha: float
    teacher_val_top1: float
    teacher_test_top1: float
    test_agreement: float  # share of test images where student and teacher predict one class
    model: nn.Module | None = field(default=None, repr=False, compare=False)


def _positive(name: str, flag: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} ({flag}) must be > 0, got {value!r}")
    return float(value)


@torch.no_grad()
def predictions(model: nn.Module, dataset: Dataset, info: DataInfo, batch_size: int = 512,
                device: torch.device | str = "cpu", num_workers: int = 0,
                skips: SkipLog | None = None) -> torch.Tensor:
    """The model's predicted class of every sample of ``dataset`` (eval mode, no augmentation)."""
    from selfsup.evaluate.features import extract_features

    logits, _ = extract_features(model, dataset, info, batch_size=batch_size, device=device,
                                 num_workers=num_workers, skips=skips)
    return logits.argmax(1)


def agreement(student: nn.Module, teacher: nn.Module, dataset: Dataset, info: DataInfo,
              batch_size: int = 512, device: torch.device | str = "cpu", num_workers: int = 0,
              skips: SkipLog | None = None) -> float:
    """Share of the samples of ``dataset`` (labelled or not) on which the two models' predicted
    classes are the same."""
    run = dict(batch_size=batch_size, device=device, num_workers=num_workers, skips=skips)
    return (predictions(student, dataset, info, **run)
            == predictions(teacher, dataset, info, **run)).float().mean().item()


def distill(teacher: nn.Module, student_backbone: nn.Module, splits: DataSplits, *,
            temperature: float = SELF_DISTILLATION_TEMPERATURE, alpha: float = 1.0,
            labelled: np.ndarray | None = None, lrs: Sequence[float] = DEFAULT_LRS,
            epochs: int = PAPER_EPOCHS, batch_size: int = PAPER_BATCH_SIZE, seed: int = 0,
            device: torch.device | str | None = None, precision: Precision = "32",
            eval_batch_size: int = 512, num_workers: int = 0,
            skips: SkipLog | None = None) -> DistillResult:
    """Distil ``teacher`` (a classifier: images -> logits) into ``student_backbone`` + a new
    linear head, on all of ``splits.train`` (labels unused, unless ``alpha < 1``), once per
    learning rate in ``lrs``; keep the student with the best validation top-1, report its test
    top-1. No weight of ``teacher`` or ``student_backbone`` changes (the teacher runs in eval
    mode on ``device``, moved there; the students train on copies of the backbone).

    ``labelled``: positions in ``splits.train`` of the labelled subset (the teacher's), needed
    for ``alpha < 1`` and only read then. ``batch_size`` is capped at the train split's size.
    Deterministic on the CPU for a given ``seed``.
    """
    temperature = _positive("temperature", "--temperature", temperature)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConfigError(f"alpha (--alpha) must be in [0, 1], got {alpha!r}")
    if not lrs:
        raise ConfigError("lrs (--lrs): the learning-rate grid is empty")
    lrs = [_positive("lrs", "--lrs", lr) for lr in lrs]
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name} ({flag}) must be an integer >= 1, got {value!r}")
    if alpha < 1.0 and (labelled is None or len(labelled) == 0):
        raise ConfigError(f"alpha (--alpha) = {alpha} weighs in the labelled loss, but no "
                          "labelled subset was given")
    info = splits.info
    if info.num_classes < 2:
        raise DataError(f"{info.name}: distillation needs at least two classes to score the "
                        f"student on (it has {info.num_classes})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = splits.train
    batch = min(batch_size, len(train))
    steps = epochs * -(-len(train) // batch)
    was_training = teacher.training
    teacher = teacher.to(device).eval()
    is_labelled = torch.zeros(len(train), dtype=torch.bool, device=device)
    if alpha < 1.0:
        is_labelled[torch.as_tensor(labelled, dtype=torch.long, device=device)] = True

    def objective(model: nn.Module, view: torch.Tensor, labels: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor:
        logits = model(view)
        with torch.no_grad():
            teacher_logits = teacher(view)
        loss = alpha * distillation(logits, teacher_logits, temperature)
        if alpha < 1.0:
            chosen = is_labelled[index]
            # Summed over the labelled images of the batch, divided by the batch: eq. 3's sums.
            supervised = F.cross_entropy(logits[chosen].float(), labels[chosen],
                                         reduction="sum") / logits.shape[0]
            loss = loss + (1.0 - alpha) * supervised
        return loss

    def lars(lr: float):
        config = OptimConfig(name="lars", lr=lr, lr_scaling="sqrt", weight_decay=WEIGHT_DECAY)
        return lambda model: build_optimizer(list(model.named_parameters()), config, batch)

    evaluate = dict(batch_size=eval_batch_size, device=device, num_workers=num_workers,
                    skips=skips)
    best: tuple[float, nn.Module, float] | None = None
    for lr in lrs:
        generator = torch.Generator().manual_seed(seed)
        student = linear_classifier(copy.deepcopy(student_backbone), info, generator)
        fit_classifier(student, train, info, lars(lr), epochs, batch, objective, generator,
                       seed=seed, warmup_steps=round(WARMUP_FRACTION * steps), device=device,
                       precision=precision, num_workers=num_workers, skips=skips)
        score = _top1(student, splits.val, info, eval_batch_size, device, num_workers, skips)
        if best is None or score > best[0]:
            best = (score, student, lr)
    assert best is not None
    score, student, lr = best
    result = DistillResult(
        val_top1=score,
        test_top1=_top1(student, splits.test, info, eval_batch_size, device, num_workers, skips),
        lr=lr, epochs=epochs, batch_size=batch, temperature=temperature, alpha=alpha,
        teacher_val_top1=_top1(teacher, splits.val, info, eval_batch_size, device, num_workers,
                               skips),
        teacher_test_top1=_top1(teacher, splits.test, info, eval_batch_size, device,
                                num_workers, skips),
        test_agreement=agreement(student, teacher, splits.test, info, **evaluate),
        model=student.eval())
    teacher.train(was_training)
    return result


def _architecture(record: dict[str, Any]) -> tuple[str, float]:
    """(backbone name, width) of the network a classifier record was built on."""
    encoder = record["encoder"]
    if encoder.get("kind") == "backbone":
        return encoder["name"], float(encoder["width"])
    backbone = record["config"]["backbone"]
    return backbone["name"], float(backbone["width"])


def distill_classifier_file(teacher_path: str | Path, out: str | Path, *, data: str | None = None,
                            backbone: str | None = None, width: float | None = None,
                            temperature: float | None = None, alpha: float = 1.0,
                            lrs: Sequence[float] | None = None, epochs: int | None = None,
                            batch_size: int | None = None, seed: int | None = None,
                            precision: Precision | None = None,
                            device: torch.device | str | None = None, num_workers: int = 0,
                            overwrite: bool = False) -> dict[str, Any]:
    """``selfsup distill``: read a fine-tuned classifier (``selfsup eval finetune --out``, or an
    earlier student), distil it (:func:`distill`) and write ``OUT/student.pt`` (a classifier file
    of the same format: it can teach in turn) and ``OUT/results.json``; returns the results.

    Data, split seed and fraction come from the teacher's pretraining config, so validation and
    test are the teacher's (``data`` may point at another copy of that dataset). Defaults: the
    teacher's architecture (``backbone``, ``width``), t = 0.1 for it and 1.0 for any other,
    ``alpha`` 1, :data:`DEFAULT_LRS`, 400 epochs, the teacher's pretraining batch, its seed and
    precision.
    """
    from selfsup.backbones import build_backbone
    from selfsup.config import Config
    from selfsup.data import load_data
    from selfsup.train import resolved_cifar_stem

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    earlier = [name for name in (STUDENT_FILE, RESULTS_FILE) if (out / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(f"--out {out}: holds an earlier distillation ({', '.join(earlier)}); "
                          "pass --overwrite to replace it, or choose another --out")
    teacher, record = load_classifier(teacher_path)
    config = Config(**record["config"])
    info = record["data_info"]
    splits = load_data(data or config.data.source, image_size=info["image_size"],
                       val_fraction=config.data.val_fraction, seed=config.train.seed)
    if splits.info.num_classes != info["num_classes"]:
        raise DataError(f"--data {data or config.data.source}: has {splits.info.num_classes} "
                        f"classes, the teacher {teacher_path} predicts {info['num_classes']}")
    teacher_arch = _architecture(record)
    name = backbone or teacher_arch[0]
    width = float(width if width is not None else teacher_arch[1])
    if temperature is None:
        temperature = (SELF_DISTILLATION_TEMPERATURE if (name, width) == teacher_arch
                       else BIG_TO_SMALL_TEMPERATURE)
    seed = config.train.seed if seed is None else seed
    cifar_stem = resolved_cifar_stem(config, info)
    torch.manual_seed(seed)  # the student's random init
    student_backbone, _ = build_backbone(name, cifar_stem=cifar_stem, width=width)
    labels = record["labels"]
    labelled = (balanced_label_subset(splits.train.labels, labels["fraction"], labels["seed"])
                if alpha < 1.0 else None)
    result = distill(teacher, student_backbone, splits, temperature=temperature, alpha=alpha,
                     labelled=labelled, lrs=DEFAULT_LRS if lrs is None else lrs,
                     epochs=PAPER_EPOCHS if epochs is None else epochs,
                     batch_size=batch_size or config.train.batch_size, seed=seed, device=device,
                     precision=precision or config.train.precision,
                     eval_batch_size=config.eval.batch_size, num_workers=num_workers)
    metrics = {"val_top1": result.val_top1, "test_top1": result.test_top1, "lr": result.lr,
               "epochs": result.epochs, "temperature": result.temperature, "alpha": result.alpha}
    out.mkdir(parents=True, exist_ok=True)
    student_path = save_classifier(
        out / STUDENT_FILE, result.model,
        encoder={"kind": "backbone", "name": name, "width": width, "cifar_stem": cifar_stem},
        config=record["config"], data_info=info, labels=labels, metrics=metrics)
    results = {"teacher": str(teacher_path), "student": str(student_path),
               "data": data or config.data.source, "student_backbone": name,
               "student_width": width, "distill_top1": result.test_top1,
               "distill_val_top1": result.val_top1, "teacher_top1": result.teacher_test_top1,
               "teacher_val_top1": result.teacher_val_top1,
               "distill_agreement": result.test_agreement, "distill_lr": result.lr,
               "distill_epochs": result.epochs, "distill_batch_size": result.batch_size,
               "distill_temperature": result.temperature, "distill_alpha": result.alpha}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results
