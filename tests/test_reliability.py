"""Damaged checkpoints, checkpoints of another model, and the skip mode for non-finite steps."""

import json

import pytest
import torch
from torch import nn

from selfsup.checkpoint import load_checkpoint_file, verify_checkpoint
from selfsup.cli import main
from selfsup.errors import CheckpointError

TINY = ["--data", "cifar10-sample", "--backbone", "resnet18", "--width", "0.125",
        "--batch-size", "16", "--num-workers", "0", "--no-eval",
        "--set", "data.val_fraction=0.9", "--set", "eval.monitor_every_n_epochs=0",
        "--set", "train.progress_bar=false", "--set", "train.log_every=1",
        "--set", "train.keep_checkpoints=5"]


def _train(out, *extra: str) -> int:
    return main(["train", "--method", "simclr", "--out", str(out), "--json", *TINY, *extra])


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory):
    """Four steps, a checkpoint after each: step00000001..4.ckpt and last.ckpt."""
    out = tmp_path_factory.mktemp("run")
    assert _train(out, "--max-steps", "4", "--checkpoint-every", "1") == 0
    return out


def _copy_run(source, destination):
    import shutil

    shutil.copytree(source, destination)
    return destination


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_checkpoint_accepts_a_good_one_and_names_a_bit_flip_and_a_truncation(
        run_with_checkpoints, tmp_path):
    good = run_with_checkpoints / "checkpoints" / "last.ckpt"
    assert verify_checkpoint(good)["global_step"] == 4
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(good.read_bytes())
    _flip_a_byte(flipped)
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt: corrupt checkpoint \(CRC-32"):
        verify_checkpoint(flipped)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"torn\.ckpt: torn or corrupt checkpoint"):
        verify_checkpoint(torn)


@pytest.mark.parametrize("damage", ["bit_flip", "truncation", "zero_bytes"])
def test_resume_auto_falls_back_to_the_previous_good_checkpoint_and_says_so(
        run_with_checkpoints, tmp_path, capsys, damage):
    out = _copy_run(run_with_checkpoints, tmp_path / "run")
    checkpoints = out / "checkpoints"
    # The newest two are damaged (last.ckpt and step 4 hold the same state): step 3 must be used.
    for name in ("last.ckpt", "step00000004.ckpt"):
        path = checkpoints / name
        if damage == "bit_flip":
            _flip_a_byte(path)
        elif damage == "truncation":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            path.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoint.*last\.ckpt.*"
                                         r"Resuming from .*step00000003\.ckpt \(step 3\)"):
        assert _train(out, "--max-steps", "5", "--resume", "auto") == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["steps"] == 5 and results["resumed_from"].endswith("step00000003.ckpt")


def test_resume_auto_with_every_checkpoint_damaged_is_an_error_naming_them(
        run_with_checkpoints, tmp_path, capsys):
    out = _copy_run(run_with_checkpoints, tmp_path / "run")
    for path in (out / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"not a checkpoint")
    assert _train(out, "--max-steps", "5", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "last.ckpt" in err and "step00000001.ckpt" in err


@pytest.mark.parametrize(("key", "other"), [("method", ["--method", "mocov2"]),
                                            ("backbone", ["--width", "0.25"]),
                                            ("method_args", ["--set", "method_args.temperature=0.2"])])
def test_resume_refuses_a_checkpoint_of_another_model_naming_what_differs(
        run_with_checkpoints, tmp_path, capsys, key, other):
    out = _copy_run(run_with_checkpoints, tmp_path / "run")
    code = main(["train", "--out", str(out), "--max-steps", "5", "--resume", "auto", "--json",
                 *TINY, "--method", "simclr", *other])
    err = capsys.readouterr().err
    assert code == 2
    assert "last.ckpt: made by a run with" in err and f"{key} = " in err, err


def _register_nan_at(steps: set[int], in_gradient: bool = False):
    from selfsup.methods import Method, StepOutput, register_method

    @register_method
    class NanAtSteps(Method):
        """A test double whose loss is NaN at chosen calls; it also counts its steps in a buffer,
        as a queue pointer would, so a skipped step must leave that buffer unchanged (2026)."""

        name = "nan_at_steps_test_double"
        views = "simclr"

        def __init__(self, backbone, context) -> None:
            super().__init__(backbone, context)
            self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
            self.head = nn.Linear(context.feature_dim, 8)
            self.calls = 0

        def training_step(self, batch):
            step, self.calls = self.calls, self.calls + 1
            self.steps_seen += 1
            loss = self.head(self.backbone(batch.views[0])).square().mean()
            if step in steps and in_gradient:
                # A finite value (sqrt(0) = 0) whose gradient is 0 * inf = NaN.
                return StepOutput(loss + 0.0 * torch.sqrt(loss - loss.detach()),
                                  logs={"part": loss.detach()})
            return StepOutput(loss * float("nan") if step in steps else loss,
                              logs={"part": loss.detach()})

    return NanAtSteps


@pytest.mark.parametrize("in_gradient", [False, True], ids=["loss", "gradient"])
def test_skip_mode_skips_non_finite_steps_leaving_weights_and_buffers_untouched(tmp_path, capsys,
                                                                                in_gradient):
    from selfsup.methods import METHODS

    _register_nan_at({2, 3}, in_gradient)
    try:
        code = main(["train", "--method", "nan_at_steps_test_double", "--out", str(tmp_path),
                     "--max-steps", "5", "--checkpoint-every", "1", "--json", *TINY,
                     "--set", "train.max_nonfinite_skips=2"])
    finally:
        METHODS.pop("nan_at_steps_test_double")
    assert code == 0, capsys.readouterr().err
    checkpoints = tmp_path / "checkpoints"
    states = {step: load_checkpoint_file(checkpoints / f"step{step:08d}.ckpt")["state_dict"]
              for step in (2, 3, 4)}
    # Steps 2 and 3 (0-based: the third and fourth) were skipped: nothing moved across them.
    for key in states[2]:
        if key != "nonfinite_skips":
            assert torch.equal(states[2][key], states[4][key]), key
    assert int(states[4]["nonfinite_skips"]) == 2
    assert int(states[4]["method.steps_seen"]) == 2  # the skipped steps' own writes undone
    final = load_checkpoint_file(checkpoints / "last.ckpt")["state_dict"]
    assert int(final["method.steps_seen"]) == 3


def test_skip_mode_stops_once_more_steps_than_allowed_are_non_finite(tmp_path, capsys):
    from selfsup.methods import METHODS

    _register_nan_at({1, 2, 3})
    try:
        code = main(["train", "--method", "nan_at_steps_test_double", "--out", str(tmp_path),
                     "--max-steps", "5", *TINY, "--set", "train.max_nonfinite_skips=2"])
    finally:
        METHODS.pop("nan_at_steps_test_double")
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss" in err and "step 3" in err and "after skipping 2" in err


def test_sync_batchnorm_option_makes_every_plain_batchnorm_global():
    from selfsup.config import resolve_config
    from selfsup.distributed import GlobalBatchNorm
    from selfsup.train import SelfSupervisedModule

    config = resolve_config({"method": "simclr", "backbone": {"width": 0.125},
                             "train": {"sync_batchnorm": True}})
    info = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": 10,
            "num_train": 100}
    module = SelfSupervisedModule(config.model_dump(mode="json"), info)
    norms = [m for m in module.method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GlobalBatchNorm) for m in norms)


def test_skip_mode_under_ddp_skips_on_every_process_together_and_then_stops(tmp_path):
    """Two gloo processes; an absurd learning rate makes the weights non-finite after the first
    update, so every later loss is NaN: both processes skip the same steps (no hang in DDP's
    gradient reduction) and stop together once the allowance is spent."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "selfsup.cli", "train", "--method", "simclr",
               "--devices", "2", "--accelerator", "cpu", "--max-steps", "6",
               "--out", str(tmp_path), *TINY, "--set", "optim.lr=1e30",
               "--set", "optim.warmup_epochs=0", "--set", "train.max_nonfinite_skips=2"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "step skipped (2 of at most 2)" in completed.stderr
    assert "non-finite loss nan at step 3" in completed.stderr
    assert "after skipping 2 such steps" in completed.stderr


def test_a_non_finite_gradient_under_a_finite_loss_stops_naming_the_step_and_parameters(
        tmp_path, capsys):
    from selfsup.methods import METHODS

    _register_nan_at({2}, in_gradient=True)
    try:
        code = main(["train", "--method", "nan_at_steps_test_double", "--out", str(tmp_path),
                     "--max-steps", "5", *TINY])
    finally:
        METHODS.pop("nan_at_steps_test_double")
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite gradient at step 2" in err and "method.backbone.conv1.weight" in err, err
    assert "last good checkpoint" in err
