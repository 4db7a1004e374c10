"""Every method on the full CIFAR-10 under one fixed CPU budget: the same backbone, batch, epochs
and precision for all, each method with its paper's optimizer and hyper-parameters.

For each method it runs ``selfsup train`` (kNN and linear probe on frozen features after
training, each beside the same network at random init), then ``selfsup eval finetune`` with 1%
and 10% of the labels (class-balanced subsets, learning rate chosen on the validation split, test
top-1 reported). Each stage's results (pretraining, each fine-tuning) are written to
``OUT/METHOD/`` as they finish, and a stage whose results are already there is not run again, so a
killed table run continues where it stopped. The table (markdown, and JSON with every figure) is written to ``OUT/table.md`` and
``OUT/table.json``.

    python benchmarks/methods_cifar10.py [--data cifar10:../shared/data/cifar10] [--epochs 3]
        [--warmup-epochs 0.3] [--methods simclr byol ...] [--set KEY=VALUE ...]
        [--out runs/methods_cifar10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from selfsup.methods import method_names


def _run_json(command: list[str], log: Path, result: Path) -> dict:
    """Run a selfsup command that prints its results as one JSON line (the last line) and keep
    them in ``result``; a stage whose ``result`` exists is not run again."""
    if result.exists():
        return json.loads(result.read_text())
    started = time.perf_counter()
    with log.open("w") as stream:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=stream, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {completed.returncode}); see {log}")
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    result.write_text(json.dumps(results, indent=2))
    return results


def finetune_epochs_for(share: str, values: list[str]) -> list[str]:
    """``--set`` arguments for the fine-tuning length of ``share`` from ``--finetune-epochs``
    (``SHARE=EPOCHS`` entries, or one number for every share); none: the paper's length."""
    for value in values:
        scope, equals, epochs = value.rpartition("=")
        if not equals or scope == share:
            return ["--set", f"eval.finetune_epochs={int(epochs)}"]
    return []


def settings_for(method: str, settings: list[str]) -> list[str]:
    """The ``--set`` values that apply to ``method``: ``KEY=VALUE`` to every method,
    ``METHOD:KEY=VALUE`` to that method only."""
    chosen = []
    for setting in settings:
        scope, colon, rest = setting.partition(":")
        if not colon or "=" in scope:
            chosen.append(setting)
        elif scope not in method_names():
            raise SystemExit(f"--set {setting}: {scope!r} is not a method "
                             f"(one of {', '.join(method_names())})")
        elif scope == method:
            chosen.append(rest)
    return chosen


def run_method(method: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / method
    out.mkdir(parents=True, exist_ok=True)
    selfsup = [sys.executable, "-m", "selfsup.cli"]
    train = _run_json([*selfsup, "train", "--method", method, "--data", args.data,
                       "--backbone", args.backbone, "--width", str(args.width),
                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                       "--precision", args.precision, "--num-workers", str(args.workers),
                       "--seed", str(args.seed), "--out", str(out / "pretrain"), "--overwrite",
                       "--set", "train.channels_last=true", "--set", "train.progress_bar=false",
                       "--set", f"eval.monitor_every_n_epochs={args.epochs}",
                       *(["--set", f"optim.warmup_epochs={args.warmup_epochs}"]
                         if args.warmup_epochs is not None else []),
                       *[arg for setting in settings_for(method, args.set)
                         for arg in ("--set", setting)], "--json"],
                      out / "train.log", out / "pretrain.json")
    row = {"method": method, "pretrain": train}
    for share in args.finetune_labels if method in args.finetune_methods else []:
        name = f"finetune_{share.rstrip('%')}"
        row[f"finetune_{share}"] = _run_json(
            [*selfsup, "eval", "finetune", "--checkpoint", train["checkpoint"],
             "--data", args.data, "--labels", share, "--no-baseline", "--json",
             "--num-workers", str(args.workers),
             *finetune_epochs_for(share, args.finetune_epochs),
             "--set", f"eval.finetune_lrs={json.dumps(args.finetune_lrs)}"],
            out / f"{name}.log", out / f"{name}.json")
    (out / "table_row.json").write_text(json.dumps(row, indent=2))
    return row


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def table_markdown(rows: list[dict], shares: list[str]) -> str:
    header = ["method", "kNN", "kNN random init", "linear", "linear random init",
              *[f"fine-tune {share}" for share in shares], "pretrain minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        train = row["pretrain"]
        cells = [row["method"], _percent(train.get("knn_top1")),
                 _percent(train.get("knn_top1_random_init")), _percent(train.get("linear_top1")),
                 _percent(train.get("linear_top1_random_init")),
                 *[_percent(row.get(f"finetune_{share}", {}).get("finetune_top1"))
                   for share in shares],
                 f"{train.get('train_seconds', train['wall_seconds']) / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10:../shared/data/cifar10")
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["32", "bf16"])
    # The papers' warm-ups (10 epochs for SimCLR, BYOL, DINO; 40 for SimCLR v2) would fill a short
    # budget; one value for every method keeps the comparison fair. Default: each paper's own.
    parser.add_argument("--warmup-epochs", type=float, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-labels", nargs="*", default=["1%", "10%"])
    # The methods that get the fine-tuning columns (default: all); the others get kNN and linear.
    parser.add_argument("--finetune-methods", nargs="*", default=method_names(),
                        choices=method_names())
    # SHARE=EPOCHS (e.g. 10%=10) or one number for every share; default: the paper's (SimCLR
    # Appendix B.5: 60 epochs for 1% of the labels, 30 for 10%).
    parser.add_argument("--finetune-epochs", nargs="*", default=[], metavar="[SHARE=]EPOCHS")
    parser.add_argument("--finetune-lrs", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value for every method's pretraining (repeatable), e.g. "
                             "backbone.cifar_stem=false; METHOD:KEY=VALUE for one method, e.g. "
                             "barlow_twins:method_args.proj_dim=2048")
    parser.add_argument("--out", default="runs/methods_cifar10")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        rows.append(run_method(method, args))
        markdown = table_markdown(rows, args.finetune_labels)
        (Path(args.out) / "table.md").write_text(markdown)
        (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2))
        print(markdown, flush=True)


if __name__ == "__main__":
    main()
