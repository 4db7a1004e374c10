"""Exact resume: a run killed with SIGKILL at random steps and resumed with ``--resume auto``
ends bitwise equal to the same run made straight, on the CPU (three kills for SimCLR and MoCo v2,
one for every other method).

Real kills of real processes: every run that is killed is a ``selfsup train`` process of its own.
The straight run and the final resume run the same command line in this process (``cli.main``),
which spares two launches of ~8 s (importing torch and Lightning) per method. Every registered
method joins (its state: queues, banks, momentum encoders, probe, optimizer, schedule, data
position, RNG).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfsup import cli
from selfsup.checkpoint import load_checkpoint_file
from selfsup.methods import method_names

# 450 training images (val_fraction 0.9) in batches of 32: 14 steps an epoch, so 32 steps cross
# two epoch boundaries.
MAX_STEPS = 32
ARGS = ["--data", "cifar10-sample", "--width", "0.125", "--batch-size", "32",
        "--num-workers", "0", "--max-steps", str(MAX_STEPS), "--seed", "3", "--no-eval",
        "--set", "data.val_fraction=0.9", "--set", "eval.monitor_every_n_epochs=0",
        "--set", "train.progress_bar=false",
        "--set", "train.log_every=1", "--set", "optim.warmup_epochs=0.5"]


def _small_sizes(method: str) -> list[str]:
    """CPU-test sizes for any method: widths (``*_dim``), stores (queues, banks) and multi-crop's
    local crops shrunk, so a new method joins this test without a special case."""
    overrides = []
    for name, default in _hyper(method).items():
        if name.endswith("_dim") and (default is None or isinstance(default, int)):
            overrides += ["--set", f"method_args.{name}=64"]
        elif name in ("queue_size", "num_negatives") and isinstance(default, int):
            overrides += ["--set", f"method_args.{name}=64"]
        elif name == "num_local_crops" and isinstance(default, int):
            overrides += ["--set", f"method_args.{name}=2"]
    return overrides


def _arguments(method: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--method", method, "--out", str(out), *ARGS, *_small_sizes(method), *extra]


def _run_here(arguments: list[str]) -> None:
    assert cli.main(arguments) == 0, arguments


def _hyper(method: str) -> dict:
    from selfsup.methods import method_hyperparameters

    return method_hyperparameters(method)


def _latest_step(checkpoints: Path) -> int:
    steps = [int(p.stem[4:]) for p in checkpoints.glob("step*.ckpt") if p.stem[4:].isdigit()]
    return max(steps, default=0)


def _state(out: Path) -> dict:
    return load_checkpoint_file(out / "checkpoints" / "last.ckpt")["state_dict"]


# The three kills for the two reference methods; one kill at a random step for every
# other method, which proves the same state round trip at a third of the CI time.
KILLS = {"simclr": 3, "mocov2": 3}


@pytest.mark.parametrize("method", method_names())
def test_run_killed_at_random_steps_and_resumed_equals_the_straight_run(method, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    _run_here(_arguments(method, straight))

    killed = tmp_path / "killed"
    rng = random.Random(method)
    targets = sorted(rng.sample(range(3, MAX_STEPS - 2), KILLS.get(method, 1)))
    for target in targets:
        process = subprocess.Popen([sys.executable, "-m", "selfsup.cli",
                                    *_arguments(method, killed, "--checkpoint-every", "1",
                                                "--resume", "auto")],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while _latest_step(killed / "checkpoints") < target and process.poll() is None:
            assert time.monotonic() < deadline, f"no checkpoint at step {target}"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    _run_here(_arguments(method, killed, "--checkpoint-every", "1", "--resume", "auto"))

    expected, resumed = _state(straight), _state(killed)
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"killed at {targets}; differs: {different[:5]}"
