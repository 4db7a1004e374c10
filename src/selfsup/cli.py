"""The ``selfsup`` command: train, eval, distill, embed, export, methods, check-data.

Errors raised on purpose (``SelfSupError``) are printed as one line naming the file, key or value
at fault, with exit status 2; ``--json`` makes the last line of stdout one JSON object.
``check-data`` exits with status 1 when it found problems.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from selfsup.errors import ConfigError, SelfSupError

# Flags of ``train`` and the config keys they set.
_TRAIN_FLAGS: dict[str, str] = {
    "method": "method", "data": "data.source", "backbone": "backbone.name",
    "width": "backbone.width", "image_size": "data.image_size", "epochs": "train.epochs",
    "max_steps": "train.max_steps", "batch_size": "train.batch_size", "seed": "train.seed",
    "precision": "train.precision", "devices": "train.devices", "num_nodes": "train.num_nodes",
    "accelerator": "train.accelerator", "checkpoint_every": "train.checkpoint_every",
    "resume": "train.resume", "out": "train.out", "num_workers": "data.num_workers",
    "lr": "optim.lr", "optimizer": "optim.name", "overwrite": "train.overwrite",
    "skip_bad": "data.skip_bad",
}
_SKIP_BAD_HELP = ("leave out (and count) undecodable images, empty class folders and bad rows of "
                  "a list file, instead of stopping at the first")
_SKIPPED_EXAMPLES = 5


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # unknown options name themselves in ``message``
        self.print_usage(sys.stderr)
        raise ConfigError(message)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="cifar10-sample | cifar10:DIR | folder:DIR | csv:FILE")
    parser.add_argument("--image-size", type=int, help="resize + center crop (folder data)")
    parser.add_argument("--download", action="store_true",
                        help="download CIFAR-10 into DIR if missing (MD5-checked)")
    parser.add_argument("--num-workers", type=int, help="data loader worker processes")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selfsup", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="pretrain an encoder, then evaluate it")
    train.add_argument("--config", help="YAML config file (see configs/)")
    train.add_argument("--method", help="simclr | mocov2 | ... (selfsup methods)")
    _add_data_arguments(train)
    train.add_argument("--backbone", help="resnet18 | resnet34 | resnet50 | vit_tiny | vit_small | vit_base | any timm model")
    train.add_argument("--width", type=float, help="width multiplier of the backbone (ResNet channels, ViT head width)")
    group = train.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=int)
    group.add_argument("--max-steps", type=int)
    train.add_argument("--batch-size", type=int, help="per device")
    train.add_argument("--lr", type=float, help="base learning rate per 256 images")
    train.add_argument("--optimizer", choices=["sgd", "lars", "adamw"])
    train.add_argument("--seed", type=int)
    train.add_argument("--precision", choices=["32", "bf16", "auto"])
    train.add_argument("--accelerator", choices=["auto", "cpu", "gpu"])
    train.add_argument("--devices", type=int, help="devices per node; > 1 runs DDP")
    train.add_argument("--num-nodes", type=int)
    train.add_argument("--checkpoint-every", type=int, help="save every N steps")
    train.add_argument("--resume", help="PATH to a checkpoint, or 'auto' for OUT's last one")
    train.add_argument("--out", help="output folder (default runs/selfsup)")
    train.add_argument("--overwrite", action="store_true", default=None,
                       help="replace an earlier run's results, checkpoints and logs in OUT")
    train.add_argument("--no-eval", action="store_true", help="skip kNN/linear after training")
    train.add_argument("--skip-bad", action="store_true", default=None, help=_SKIP_BAD_HELP)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set any config key, e.g. --set method_args.temperature=0.2")
    train.add_argument("--json", action="store_true", help="print results as one JSON line")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint's backbone: kNN or linear "
                                   "probe on frozen features, or fine-tuning on a share of labels")
    evaluate.add_argument("protocol", choices=["knn", "linear", "finetune"])
    evaluate.add_argument("--checkpoint", required=True)
    _add_data_arguments(evaluate)
    evaluate.add_argument("--labels", metavar="SHARE",
                          help="finetune: the class-balanced share of the train labels to use: "
                          "1%%, 10%%, 100%% or a fraction such as 0.1")
    evaluate.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                          help="set an eval config key, e.g. --set eval.finetune_epochs=10")
    evaluate.add_argument("--no-baseline", action="store_true",
                          help="skip the random-init baseline")
    evaluate.add_argument("--out", metavar="FILE.pt",
                          help="finetune: write the chosen classifier there (the teacher of "
                          "selfsup distill)")
    evaluate.add_argument("--json", action="store_true")

    distill = commands.add_parser(
        "distill", help="distil a fine-tuned classifier into a student on the unlabeled train "
        "images (SimCLR v2's self-distillation)")
    distill.add_argument("--teacher", required=True, metavar="FILE.pt",
                         help="a classifier written by selfsup eval finetune --out (or distill)")
    distill.add_argument("--out", required=True, metavar="DIR",
                         help="writes DIR/student.pt (a classifier file) and DIR/results.json")
    distill.add_argument("--data", help="another copy of the teacher's dataset (default: the "
                         "teacher's)")
    distill.add_argument("--backbone", help="student backbone (default: the teacher's)")
    distill.add_argument("--width", type=float, help="student width (default: the teacher's)")
    distill.add_argument("--epochs", type=int, help="default 400 (the paper's)")
    distill.add_argument("--batch-size", type=int,
                         help="default: the teacher's pretraining batch, as the paper")
    distill.add_argument("--lrs", type=float, nargs="+", metavar="LR",
                         help="learning rates per 256 images (square-root scaled, LARS) to "
                         "choose from on the validation split; default 0.8 1.6 3.2")
    distill.add_argument("--temperature", type=float,
                         help="default 0.1 for the teacher's architecture, 1.0 for another")
    distill.add_argument("--alpha", type=float, default=1.0,
                         help="weight of the distillation loss; 1 - alpha weighs the "
                         "cross-entropy on the teacher's labelled subset (default 1)")
    distill.add_argument("--seed", type=int)
    distill.add_argument("--precision", choices=["32", "bf16", "auto"])
    distill.add_argument("--num-workers", type=int, help="data loader worker processes")
    distill.add_argument("--overwrite", action="store_true",
                         help="replace an earlier distillation's student.pt and results.json")
    distill.add_argument("--json", action="store_true")

    embed = commands.add_parser("embed", help="write backbone features of a dataset to .npy")
    embed.add_argument("--checkpoint", required=True)
    _add_data_arguments(embed)
    embed.add_argument("--split", choices=["train", "val", "test"], default="test")
    embed.add_argument("--out", required=True, help="FILE.npy (labels go to FILE.labels.npy)")
    embed.add_argument("--json", action="store_true")

    export = commands.add_parser("export", help="write a checkpoint's backbone as safetensors")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True,
                        help="FILE.safetensors (load it with selfsup.export.load_backbone)")
    export.add_argument("--json", action="store_true")

    methods = commands.add_parser("methods", help="list methods and their default settings")
    methods.add_argument("--json", action="store_true")

    check = commands.add_parser("check-data", help="decode every image of a dataset up front "
                                "and list the problems (exit status 1 if any)")
    check.add_argument("data", metavar="SPEC_OR_DIR",
                       help="cifar10-sample | cifar10:DIR | folder:DIR | csv:FILE | DIR")
    check.add_argument("--image-size", type=int, help="resize + center crop (folder data)")
    check.add_argument("--num-workers", type=int, help="decoding worker processes")
    check.add_argument("--skip-bad", action="store_true",
                       help="list empty class folders and bad or missing list rows with the "
                       "other problems, as train --skip-bad would skip them, instead of stopping")
    check.add_argument("--json", action="store_true")
    return parser


def _train_config(args: argparse.Namespace):
    from selfsup.config import apply_overrides, read_yaml, resolve_config, set_dotted

    file_values = read_yaml(args.config) if args.config else {}
    overrides: dict[str, Any] = {}
    for flag, key in _TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_dotted(overrides, key.split("."), value)
    if args.download:
        set_dotted(overrides, ["data", "download"], True)
    if args.no_eval:
        set_dotted(overrides, ["eval", "after_training"], [])
    apply_overrides(overrides, args.set)
    origin = args.config or "command line"
    return resolve_config(file_values, overrides, origin=origin)


def _load_for_eval(args: argparse.Namespace):
    from selfsup.checkpoint import method_from_checkpoint
    from selfsup.data import load_data

    config, info, method = method_from_checkpoint(args.checkpoint)
    splits = load_data(args.data or config.data.source,
                       image_size=args.image_size or info["image_size"],
                       val_fraction=config.data.val_fraction, seed=config.train.seed,
                       download=args.download)
    return config, info, splits, method


def _command_train(args: argparse.Namespace) -> dict[str, Any]:
    from selfsup.train import train

    config = _train_config(args)
    return train(config)


def _label_fraction(args: argparse.Namespace) -> float | None:
    """``--labels`` as a fraction in (0, 1]: ``10%`` or ``0.1``; given with finetune only."""
    from selfsup.evaluate import check_label_fraction

    if args.protocol != "finetune":
        if args.labels is not None:
            raise ConfigError(f"--labels {args.labels}: only eval finetune uses labels")
        return None
    if args.labels is None:
        raise ConfigError("eval finetune: --labels is required (1%, 10%, 100% or a fraction "
                          "such as 0.1)")
    text = args.labels.strip()
    try:
        return check_label_fraction(float(text[:-1]) / 100 if text.endswith("%") else float(text))
    except ValueError:  # not a number, or out of range (ConfigError is a ValueError)
        raise ConfigError(f"--labels {args.labels!r}: expected a share of the labels in (0, 1]: "
                          "1%, 10%, 100% or a fraction such as 0.1") from None


def _eval_config(config, overrides: list[str], origin: str):
    """The checkpoint's config with ``--set eval.KEY=VALUE`` applied; other sections would no
    longer describe the checkpoint's network, so only ``eval`` keys may be set."""
    from selfsup.config import parse_override, resolve_config, set_dotted

    if not overrides:
        return config
    values: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        if path[0] != "eval" or len(path) != 2:
            raise ConfigError(f"--set {text!r}: eval accepts eval.KEY=VALUE keys only")
        set_dotted(values, path, value)
    return resolve_config(config.model_dump(), values, origin=f"{origin} with --set")


def _command_eval(args: argparse.Namespace) -> dict[str, Any]:
    from selfsup.evaluate import evaluate_backbone, finetune_backbone
    from selfsup.train import build_pretraining_method

    fraction = _label_fraction(args)
    if args.out is not None and fraction is None:
        raise ConfigError(f"--out {args.out}: only eval finetune writes a classifier")
    config, info, splits, method = _load_for_eval(args)
    config = _eval_config(config, args.set, args.checkpoint)
    workers = args.num_workers or 0

    def evaluate(method, suffix: str, out: str | None = None) -> dict[str, Any]:
        if fraction is not None:
            # What the method's paper fine-tunes: the backbone, or more (SimCLR v2).
            return finetune_backbone(method.finetune_encoder(fraction), splits, config.eval,
                                     fraction, seed=config.train.seed,
                                     precision=config.train.precision, suffix=suffix,
                                     num_workers=workers, classifier_out=out,
                                     pretraining={"config": config.model_dump(mode="json"),
                                                  "data_info": info})
        # method.backbone: the online network of momentum methods, the one their papers evaluate.
        return evaluate_backbone(method.backbone, splits, config.eval, [args.protocol],
                                 seed=config.train.seed, suffix=suffix, num_workers=workers)

    results = {"checkpoint": args.checkpoint, "data": args.data or config.data.source}
    results.update(evaluate(method, "", args.out))
    if not args.no_baseline:
        results.update(evaluate(build_pretraining_method(config, info), "_random_init"))
    return results


def _command_distill(args: argparse.Namespace) -> dict[str, Any]:
    from selfsup.evaluate.distill import distill_classifier_file

    return distill_classifier_file(
        args.teacher, args.out, data=args.data, backbone=args.backbone, width=args.width,
        temperature=args.temperature, alpha=args.alpha, lrs=args.lrs, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, precision=args.precision,
        num_workers=args.num_workers or 0, overwrite=args.overwrite)


def _command_embed(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from selfsup.evaluate import extract_features

    config, info, splits, method = _load_for_eval(args)
    dataset = getattr(splits, args.split)
    features, labels = extract_features(method.backbone, dataset, splits.info,
                                        batch_size=config.eval.batch_size,
                                        num_workers=args.num_workers or 0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, features.numpy())
    labels_path = out.with_suffix(".labels.npy")
    np.save(labels_path, labels.numpy())
    return {"embeddings": str(out), "labels": str(labels_path), "shape": list(features.shape)}


def _command_export(args: argparse.Namespace) -> dict[str, Any]:
    from selfsup.export import export_backbone

    results = export_backbone(args.checkpoint, args.out)
    if not args.json:
        print(f"wrote {results['weights']}: {results['backbone']} backbone of {results['method']}, "
              f"{results['feature_dim']}-d features")
    return results


def _command_methods(args: argparse.Namespace) -> dict[str, Any]:
    from selfsup.methods import METHODS, method_hyperparameters

    table = {}
    for name in sorted(METHODS):
        cls = METHODS[name]
        table[name] = {"views": cls.views, "hyperparameters": method_hyperparameters(name),
                       "optimizer": cls.default_optimizer,
                       "paper": (cls.__doc__ or "").strip().splitlines()[0]}
    if not args.json:
        for name, entry in table.items():
            settings = ", ".join(f"{k}={v}" for k, v in entry["hyperparameters"].items())
            print(f"{name:10s} {entry['paper']}\n{'':10s} views={entry['views']}; {settings}")
    return {"methods": table}


def _command_check_data(args: argparse.Namespace) -> dict[str, Any]:
    from selfsup.config import DataConfig
    from selfsup.data.check import check_data

    workers = args.num_workers if args.num_workers is not None else DataConfig().num_workers
    report = check_data(args.data, image_size=args.image_size, skip_bad=args.skip_bad,
                        num_workers=workers)
    if not args.json:
        classes = report["classes"]
        print(f"{report['data']}: " + (f"{len(classes)} classes ({', '.join(classes)})"
                                       if classes else "unlabeled"))
        for name, split in report["splits"].items():
            print(f"  {name:9s} {split['images']:8d} images checked, {split['bad']} bad")
        print(f"{len(report['problems'])} problems found" + (":" if report["problems"] else ""))
        for problem in report["problems"]:
            print(f"  {problem}")
    return report


def _print_skipped(results: dict[str, Any]) -> None:
    if "skipped_samples" not in results:
        return
    print(f"skipped {results['skipped_samples']} bad samples (data.skip_bad)"
          + (":" if results["skipped_samples"] else ""))
    for problem in results["skipped_examples"][:_SKIPPED_EXAMPLES]:
        print(f"  {problem}")
    if results["skipped_samples"] > _SKIPPED_EXAMPLES:
        print(f"  ... and {results['skipped_samples'] - _SKIPPED_EXAMPLES} more")


def _print_results(results: dict[str, Any]) -> None:
    _print_skipped(results)
    keys = [k for k in results if k.endswith("top1") and not k.endswith("_random_init")]
    if not keys:
        return
    print(f"\n{'metric':22s} {'pretrained':>11s} {'random init':>12s}")
    for key in keys:
        baseline = results.get(f"{key}_random_init")
        baseline_text = f"{baseline:12.4f}" if baseline is not None else f"{'':12s}"
        print(f"{key:22s} {results[key]:11.4f} {baseline_text}")
    for key in ("checkpoint", "loss_plot", "classifier", "student"):
        if key in results:
            print(f"{key}: {results[key]}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "json", False):
            # Keep stdout's last line the JSON object: library chatter goes to stderr.
            logging.getLogger("lightning").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        handler = {"train": _command_train, "eval": _command_eval,
                   "distill": _command_distill, "embed": _command_embed,
                   "export": _command_export, "methods": _command_methods,
                   "check-data": _command_check_data}[args.command]
        results = handler(args)
    except SelfSupError as error:
        print(f"selfsup: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsup: interrupted", file=sys.stderr)
        return 130
    if results and os.environ.get("LOCAL_RANK", "0") == "0":
        if getattr(args, "json", False) or args.command == "embed":
            print(json.dumps(results))
        elif args.command not in ("methods", "check-data"):
            _print_results(results)
    return 1 if args.command == "check-data" and results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
