"""Quality against lightly: our method and lightly's on CIFAR-10, same budget.

Both train the same backbone (selfsup's ResNet-18, ``--width``, ImageNet stem unless
``--cifar-stem``, from the same random init) for the same epochs at the same batch size, on the
same images, on this machine (the same CPU budget), and are evaluated the same way:

- ours: ``selfsup.train.train`` with our CIFAR-10 recipe of ``--method``,
  ``configs/METHOD_cifar10.yaml`` (for simclr the paper's CIFAR-10 settings, Appendix B.9: LARS,
  lr 1.2 x sqrt(batch / 256), weight decay 1e-6, 10 warm-up epochs unless ``--warmup-epochs``;
  projector hidden width = feature width, output 128; temperature 0.5), bf16 autocast and
  channels_last, augmentation batched on the device; backbone, batch and epochs are this run's,
  and ``--set KEY=VALUE`` changes any other key of ours;
- lightly: the recipe of its CIFAR-10 benchmark script for the same method
  (``lightly_recipes.py``; for simclr ``SimCLRTransform`` on PIL images in DataLoader workers,
  ``SimCLRProjectionHead``, ``NTXentLoss``, SGD lr 6e-2 x batch / 128 with momentum 0.9, weight
  decay 5e-4 and a per-epoch cosine), fp32. Methods: simclr, byol, simsiam, swav, dino.

The data: CIFAR-10's 50,000 training images minus our validation split (5,000, stratified,
``data.val_fraction`` and seed as our trainer carves it) train both; the kNN bank is that
training split, the queries are the validation split and the 10,000 test images (``--sample``:
the embedded sample's 4,500 / 500 / 1,000 instead, the learning tests' data). After every
epoch each backbone is evaluated with ``selfsup.evaluate`` (weighted kNN, k = 200, T = 0.1, on
frozen pooled features of clean images, each model's images normalized as it was trained:
CIFAR-10 statistics for ours, lightly's ImageNet ones for lightly). Each side's network is the
one its own code evaluates (ours: the method's ``backbone``, e.g. DINO's teacher; lightly: the
trained backbone, DINO's student). Our trainer's own monitor only reports validation kNN against
a 10,000-image bank, so it is switched off, and the trainer saves a checkpoint at the end of
every epoch (``train.checkpoint_every`` = steps per epoch) that is evaluated after training;
lightly's backbone is copied at the end of every epoch. Evaluation is outside both wall times.

How the epoch is chosen: for each side, the epoch with the best validation kNN top-1 (the
earliest on a tie; random init is not a candidate), and that epoch's test kNN top-1 is reported,
with its lift over the same network at random init. The test split never chooses anything.
Target (issue #5, item 4, for simclr): our chosen test kNN is at least lightly's. For the other
methods the comparison says whether a method that fails to learn at a small scale fails in
lightly's recipe too.

    python benchmarks/quality.py [--method simclr] [--epochs 3] [--batch-size 256] [--width 0.5]
        [--cifar-stem] [--workers 2] [--data ../shared/data/cifar10 | --sample]
        [--set KEY=VALUE ...] [--out quality.json]
    python benchmarks/quality.py --train-subset 1024 --epochs 1 --batch-size 128  # smoke run
    python benchmarks/quality.py --method swav --sample --width 0.25 --batch-size 64 \
        --epochs 20 --set method_args.num_local_crops=0  # the learning tests' scale

``--train-subset N`` trains (and carves the validation split) from N training images drawn with
the seed, for smoke runs; the test split stays whole. Needs the ``bench`` extra (lightly).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightly_recipes import (LIGHTLY_RECIPES, lightly_loader, lightly_normalization,  # benchmarks/
                             require_lightly)
from torch import nn

from selfsup.config import Config, apply_overrides, read_yaml, resolve_config
from selfsup.data import DataSplits, load_data
from selfsup.errors import SelfSupError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
SAMPLE = "cifar10-sample"


def our_recipe(method: str) -> Path:
    return REPO / "configs" / f"{method}_cifar10.yaml"


# -- choosing the epoch and judging the result (no lightly, no training: unit-tested) -----------
def choose_epoch(val_top1: list[float]) -> int:
    """The 1-based epoch with the best validation kNN top-1; the earliest on a tie."""
    if not val_top1:
        raise ValueError("no epochs to choose from")
    return max(range(len(val_top1)), key=lambda i: (val_top1[i], -i)) + 1


def chosen(epochs: list[dict[str, float]]) -> dict[str, float]:
    """``{"epoch", "val", "test"}`` of the epoch chosen on validation kNN, from per-epoch
    ``{"val", "test"}`` (epoch 1 first)."""
    epoch = choose_epoch([scores["val"] for scores in epochs])
    return {"epoch": epoch, **epochs[epoch - 1]}


def verdict(ours_test: float, lightly_test: float) -> str:
    difference = 100 * (ours_test - lightly_test)
    met = "met" if ours_test >= lightly_test else "MISSED"
    return (f"target ours >= lightly (chosen epoch's test kNN top-1): {met} "
            f"({100 * ours_test:.2f}% vs {100 * lightly_test:.2f}%, {difference:+.2f} points)")


def table(report: dict[str, Any]) -> str:
    ours, lightly = report["ours"], report["lightly"]
    lines = [f"{'epoch':>15s} {'ours val':>9s} {'ours test':>10s} {'lightly val':>12s} "
             f"{'lightly test':>13s}"]
    rows = [("0 (random init)", ours["random_init"], lightly["random_init"])]
    rows += [(str(e + 1), o, l) for e, (o, l) in enumerate(zip(ours["epochs"], lightly["epochs"]))]
    for label, o, l in rows:
        lines.append(f"{label:>15s} {100 * o['val']:9.2f} {100 * o['test']:10.2f} "
                     f"{100 * l['val']:12.2f} {100 * l['test']:13.2f}")
    oc, lc = ours["chosen"], lightly["chosen"]
    lines += [
        f"chosen epoch (best val kNN): ours {oc['epoch']}, lightly {lc['epoch']}",
        f"lift of the chosen epoch's test kNN over random init: ours "
        f"{100 * (oc['test'] - ours['random_init']['test']):+.2f} points, lightly "
        f"{100 * (lc['test'] - lightly['random_init']['test']):+.2f} points",
        f"test kNN top-1 at the chosen epoch: ours {100 * oc['test']:.2f}%, lightly "
        f"{100 * lc['test']:.2f}%, ours - lightly {100 * (oc['test'] - lc['test']):+.2f} points",
        f"training wall time: ours {ours['train_seconds']:.1f} s, lightly "
        f"{lightly['train_seconds']:.1f} s "
        f"(lightly / ours {lightly['train_seconds'] / ours['train_seconds']:.2f}x)",
        verdict(oc["test"], lc["test"]),
    ]
    return "\n".join(lines)


# -- data ---------------------------------------------------------------------------------------
def data_source(data: Path, train_subset: int | None, seed: int, work_dir: Path) -> str:
    """The ``cifar10:DIR`` spec both sides load: ``data`` itself, or a copy of it holding
    ``train_subset`` training images drawn with ``seed`` (and the whole test split)."""
    if not data.is_dir():
        raise SystemExit(f"quality: no CIFAR-10 at {data} (expected the folder holding "
                         "cifar10.npz; pass --data DIR)")
    if train_subset is None:
        return f"cifar10:{data}"
    from selfsup.data.cifar import NPZ_NAME, read_cifar10_dir

    arrays = read_cifar10_dir(data)
    if not 0 < train_subset <= len(arrays.y_train):
        raise SystemExit(f"--train-subset {train_subset}: expected 1..{len(arrays.y_train)}")
    picked = np.sort(np.random.default_rng(seed).permutation(len(arrays.y_train))[:train_subset])
    subset = work_dir / "train_subset"
    subset.mkdir(parents=True, exist_ok=True)
    np.savez(subset / NPZ_NAME, x_train=arrays.x_train[picked].transpose(0, 2, 3, 1),
             y_train=arrays.y_train[picked], x_test=arrays.x_test.transpose(0, 2, 3, 1),
             y_test=arrays.y_test, classes=np.array(arrays.classes))
    return f"cifar10:{subset}"


def knn_scores(backbone: nn.Module, splits: DataSplits, config: Config) -> dict[str, float]:
    """Validation and test kNN top-1 of ``backbone`` against the training split."""
    from selfsup.evaluate import evaluate_backbone

    results = evaluate_backbone(backbone, splits, config.eval, ["knn"])
    return {"val": results["knn_val_top1"], "test": results["knn_top1"]}


# -- the two sides ------------------------------------------------------------------------------
def our_config(source: str, args: argparse.Namespace) -> Config:
    """Our CIFAR-10 recipe of ``args.method`` (``configs/METHOD_cifar10.yaml``; simclr's is the
    paper's Appendix B.9: LARS lr 1.2 x sqrt(B/256), wd 1e-6, T 0.5) at this run's backbone,
    batch and epochs, then ``--set``; ``train.checkpoint_every`` is left to set to the steps per
    epoch."""
    overrides: dict[str, Any] = {
        "method": args.method,
        "data": {"source": source, "num_workers": args.workers},
        "backbone": {"name": "resnet18", "width": args.width, "cifar_stem": args.cifar_stem},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "precision": "bf16",
                  "channels_last": True, "seed": args.seed, "progress_bar": False,
                  "accelerator": "gpu" if args.device == "cuda" else "cpu",
                  "out": str(args.work_dir / "ours"), "overwrite": True,
                  "keep_checkpoints": args.epochs},
        # The monitor (validation kNN against a 10,000-image bank) and the after-training
        # evaluation are replaced by the per-epoch evaluation here.
        "eval": {"monitor_every_n_epochs": 0, "after_training": []},
    }
    if args.warmup_epochs is not None:
        overrides["optim"] = {"warmup_epochs": args.warmup_epochs}
    apply_overrides(overrides, args.set)
    return resolve_config(read_yaml(our_recipe(args.method)), overrides=overrides,
                          origin=f"benchmarks/quality.py --method {args.method}")


def epoch_checkpoints(checkpoint_dir: Path, steps_per_epoch: int, epochs: int) -> list[Path]:
    """The trainer's end-of-epoch checkpoints (``step{STEP:08d}.ckpt``), epoch 1 first."""
    by_step = {int(m.group(1)): path for path in checkpoint_dir.glob("step*.ckpt")
               if (m := re.fullmatch(r"step(\d+)\.ckpt", path.name))}
    wanted = [epoch * steps_per_epoch for epoch in range(1, epochs + 1)]
    missing = [step for step in wanted if step not in by_step]
    if missing:
        raise SystemExit(f"quality: no checkpoint for steps {missing} in {checkpoint_dir} "
                         f"(found {sorted(by_step)})")
    return [by_step[step] for step in wanted]


def run_ours(config: Config, splits: DataSplits, steps_per_epoch: int) -> dict[str, Any]:
    from selfsup.checkpoint import method_from_checkpoint
    from selfsup.train import build_pretraining_method, data_info_dict, train

    started = time.perf_counter()
    results = train(config)
    wall = time.perf_counter() - started
    checkpoints = epoch_checkpoints(Path(config.train.out) / "checkpoints", steps_per_epoch,
                                    config.train.epochs)
    epochs = []
    for epoch, path in enumerate(checkpoints, 1):
        epochs.append(knn_scores(method_from_checkpoint(path)[2].backbone, splits, config))
        print(f"ours epoch {epoch}: {epochs[-1]}", flush=True)
    random_init = build_pretraining_method(config, data_info_dict(splits.info)).backbone
    return {"epochs": epochs, "random_init": knn_scores(random_init, splits, config),
            "train_seconds": results["train_seconds"], "wall_seconds": round(wall, 1),
            "steps": results["steps"], "lr": results["lr"], "optimizer": config.optim.name,
            "warmup_epochs": config.optim.warmup_epochs, "chosen": chosen(epochs)}


def run_lightly(config: Config, splits: DataSplits, device: torch.device,
                workers: int) -> dict[str, Any]:
    from selfsup.train import build_pretraining_method, data_info_dict

    # The same backbone as ours, from the same random init.
    method = build_pretraining_method(config, data_info_dict(splits.info))
    initial = copy.deepcopy(method.backbone)
    train = splits.train
    torch.manual_seed(config.train.seed)
    recipe = LIGHTLY_RECIPES[config.method]
    model = recipe(method.backbone, method.context.feature_dim, config.train.batch_size,
                   config.train.epochs, device)
    started = time.perf_counter()
    loader = lightly_loader(train.images[train.positions], config.train.batch_size, workers,
                            recipe)
    snapshots, steps, epoch_seconds = [], 0, []
    for _ in range(config.train.epochs):
        epoch_started = time.perf_counter()
        for batch in loader:
            model.step(batch)
            steps += 1
        model.end_epoch()
        snapshots.append(copy.deepcopy(model.backbone).cpu())
        epoch_seconds.append(round(time.perf_counter() - epoch_started, 1))
    train_seconds = time.perf_counter() - started
    del loader  # its workers
    # lightly's backbone sees its own (ImageNet) normalization, as lightly's benchmark evaluates.
    mean, std = lightly_normalization()
    own_inputs = dataclasses.replace(splits, info=dataclasses.replace(splits.info, mean=mean,
                                                                      std=std))
    epochs = []
    for epoch, snapshot in enumerate(snapshots, 1):
        epochs.append(knn_scores(snapshot, own_inputs, config))
        print(f"lightly epoch {epoch}: {epochs[-1]}", flush=True)
    return {"epochs": epochs, "random_init": knn_scores(initial, own_inputs, config),
            "train_seconds": round(train_seconds, 1), "epoch_seconds": epoch_seconds,
            "steps": steps, "lr": model.optimizer.param_groups[0]["initial_lr"],
            "optimizer": type(model.optimizer).__name__, "chosen": chosen(epochs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="simclr", choices=sorted(LIGHTLY_RECIPES))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=False,
                        help="the CIFAR stem (3x3 conv, no max-pool); default the ImageNet stem")
    parser.add_argument("--workers", type=int, default=2, help="loader workers, each side")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding cifar10.npz (default ../shared/data/cifar10 beside "
                        "the repository)")
    parser.add_argument("--sample", action="store_true",
                        help="the embedded CIFAR-10 sample (the learning tests' data) instead "
                        "of --data")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a key of our config, e.g. --set method_args.num_local_crops=0")
    parser.add_argument("--train-subset", type=int, metavar="N",
                        help="train on N training images only (smoke runs)")
    # SimCLR's 10 warm-up epochs (its default) exceed a short run; e.g. 0.3 as in
    # benchmarks/methods_cifar10.py's table. lightly's recipe has no warm-up.
    parser.add_argument("--warmup-epochs", type=float, default=None,
                        help="our warm-up in epochs (default: SimCLR's 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "quality",
                        help="our trainer's output folder (checkpoints, logs) goes in WORK/ours")
    parser.add_argument("--out", type=Path, help="also write every figure as JSON here")
    args = parser.parse_args(argv)
    if args.sample and args.train_subset is not None:
        parser.error("--sample and --train-subset: choose one (the sample is a subset already)")
    require_lightly()
    device = torch.device(args.device)
    try:
        source = SAMPLE if args.sample else data_source(
            args.data.expanduser().resolve(), args.train_subset, args.seed, args.work_dir)
        config = our_config(source, args)
        # The splits as our trainer carves them (the same call as selfsup.train.train's).
        splits = load_data(source, val_fraction=config.data.val_fraction, seed=config.train.seed)
        steps_per_epoch = len(splits.train) // args.batch_size
        if steps_per_epoch < 1:
            raise SystemExit(f"--batch-size {args.batch_size}: more than the "
                             f"{len(splits.train)} training images")
        # A checkpoint at the end of every epoch, all kept: evaluated after training.
        config.train.checkpoint_every = steps_per_epoch
        name = (torch.cuda.get_device_name() if device.type == "cuda"
                else f"CPU x{torch.get_num_threads()}")
        print(f"device: {name}; torch {torch.__version__}; {len(splits.train)} train / "
              f"{len(splits.val)} val / {len(splits.test)} test images; ResNet-18 width "
              f"{args.width}, {'CIFAR' if args.cifar_stem else 'ImageNet'} stem; batch "
              f"{args.batch_size}; {args.epochs} epochs of {steps_per_epoch} steps", flush=True)
        ours = run_ours(config, splits, steps_per_epoch)
        lightly = run_lightly(config, splits, device, args.workers)
    except SelfSupError as error:
        raise SystemExit(f"quality: {error}") from None
    report = {"method": args.method, "overrides": args.set, "data": source, "device": name,
              "torch": torch.__version__,
              "train_images": len(splits.train), "val_images": len(splits.val),
              "test_images": len(splits.test), "backbone": "resnet18", "width": args.width,
              "cifar_stem": args.cifar_stem, "batch_size": args.batch_size,
              "epochs": args.epochs, "workers": args.workers, "seed": args.seed,
              "knn_k": config.eval.knn_k, "knn_temperature": config.eval.knn_temperature,
              "ours": ours, "lightly": lightly,
              "difference_test": ours["chosen"]["test"] - lightly["chosen"]["test"],
              "target_met": ours["chosen"]["test"] >= lightly["chosen"]["test"]}
    print("\n" + table(report), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
