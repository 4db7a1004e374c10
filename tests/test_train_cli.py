"""End to end through the real command line: train writes a checkpoint that eval, embed and
--resume read; the same seed gives the same weights."""

import json
import warnings

import numpy as np
import pytest
import torch

from selfsup.checkpoint import load_checkpoint_file
from selfsup.cli import main

TINY = ["--data", "cifar10-sample", "--backbone", "resnet18", "--width", "0.125",
        "--batch-size", "32", "--num-workers", "0", "--set", "eval.monitor_every_n_epochs=0",
        "--set", "train.progress_bar=false", "--set", "train.log_every=1"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--method", "mocov2", "--max-steps", "3", "--out", str(out),
                 "--set", "method_args.queue_size=64", "--set", "eval.after_training=[knn]",
                 "--json", *TINY])
    assert code == 0
    return out


def test_train_writes_last_checkpoint_results_and_loss_plot(trained_run):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    results = json.loads((trained_run / "results.json").read_text())
    assert results["steps"] == 3
    assert 0.0 <= results["knn_top1"] <= 1.0 and "knn_top1_random_init" in results
    assert (trained_run / "loss.png").is_file()
    state = load_checkpoint_file(checkpoint)["state_dict"]
    assert "method.queue.keys" in state and "method.queue.pointer" in state


def test_eval_knn_reads_the_checkpoint_and_reports_the_random_init_baseline(trained_run, capsys):
    assert main(["eval", "knn", "--checkpoint", str(trained_run / "checkpoints" / "last.ckpt"),
                 "--json"]) == 0
    results = _last_json(capsys)
    saved = json.loads((trained_run / "results.json").read_text())
    assert results["knn_top1"] == pytest.approx(saved["knn_top1"], abs=1e-6)
    assert results["knn_top1_random_init"] == pytest.approx(saved["knn_top1_random_init"],
                                                            abs=1e-6)


def test_embed_writes_one_feature_row_per_test_image(trained_run, tmp_path, capsys):
    target = tmp_path / "emb.npy"
    assert main(["embed", "--checkpoint", str(trained_run / "checkpoints" / "last.ckpt"),
                 "--data", "cifar10-sample", "--out", str(target)]) == 0
    features = np.load(target)
    labels = np.load(tmp_path / "emb.labels.npy")
    assert features.shape[0] == labels.shape[0] == 1000
    assert np.isfinite(features).all()


def test_resume_auto_continues_from_the_last_checkpoint(trained_run, capsys):
    assert main(["train", "--method", "mocov2", "--max-steps", "5", "--out", str(trained_run),
                 "--resume", "auto", "--set", "method_args.queue_size=64", "--no-eval",
                 "--json", *TINY]) == 0
    assert _last_json(capsys)["steps"] == 5
    # The resumed attempt logs beside the first one; neither attempt's metrics are lost.
    assert len(list((trained_run / "logs" / "csv").glob("version_*/metrics.csv"))) == 2


def test_two_runs_with_the_same_seed_give_identical_weights(tmp_path):
    states = []
    for name in ("a", "b"):
        assert main(["train", "--method", "simclr", "--max-steps", "3", "--seed", "7",
                     "--out", str(tmp_path / name), "--no-eval", *TINY]) == 0
        states.append(load_checkpoint_file(tmp_path / name / "checkpoints" / "last.ckpt")
                      ["state_dict"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_bf16_precision_trains_on_cpu(tmp_path, capsys):
    assert main(["train", "--method", "simclr", "--max-steps", "2", "--precision", "bf16",
                 "--out", str(tmp_path), "--no-eval", "--json", *TINY]) == 0
    results = _last_json(capsys)
    assert np.isfinite(results["final_loss"])
    assert results["precision"] == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_in_bf16_only_on_a_cpu_with_native_bf16(native, tmp_path, capsys,
                                                                      monkeypatch):
    import lightning

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    trainer_precisions = []

    class RecordingTrainer(lightning.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainer_precisions.append(self.precision)

    monkeypatch.setattr("selfsup.train.L.Trainer", RecordingTrainer)
    assert main(["train", "--method", "simclr", "--max-steps", "1", "--precision", "auto",
                 "--accelerator", "cpu", "--out", str(tmp_path), "--no-eval", "--json",
                 *TINY]) == 0
    assert _last_json(capsys)["precision"] == ("bf16" if native else "32")
    # What Lightning trains in, not only what the results say.
    assert trainer_precisions == ["bf16-mixed" if native else "32-true"]


def test_two_cpu_devices_run_ddp_over_gloo_and_write_one_checkpoint(tmp_path):
    import subprocess
    import sys

    # A real two-process run through the console entry point: Lightning re-launches it per rank.
    command = [sys.executable, "-m", "selfsup.cli", "train", "--method", "mocov2",
               "--devices", "2", "--accelerator", "cpu", "--max-steps", "2",
               "--out", str(tmp_path), "--set", "method_args.queue_size=64", "--no-eval",
               "--json", *TINY]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "distributed_backend=gloo" in completed.stdout + completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["steps"] == 2 and results["global_batch_size"] == 64
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_checkpoints(tmp_path, capsys):
    import torch

    from selfsup.methods import METHODS, Method, StepOutput, register_method

    @register_method
    class ExplodingMethod(Method):
        """A method whose loss is NaN from its third step (test double, 2026)."""

        name = "exploding_test_double"
        views = "simclr"

        def __init__(self, backbone, context) -> None:
            super().__init__(backbone, context)
            self.steps = 0

        def training_step(self, batch):
            self.steps += 1
            loss = self.backbone(batch.views[0]).mean()
            return StepOutput(loss * float("nan") if self.steps >= 3 else loss,
                              logs={"part": loss.detach()})

    try:
        code = main(["train", "--method", "exploding_test_double", "--max-steps", "5",
                     "--out", str(tmp_path), "--no-eval", *TINY])
    finally:
        METHODS.pop("exploding_test_double")
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss" in err and "step 2" in err and "checkpoints" in err and "part" in err


def test_a_run_whose_embeddings_collapse_is_warned_of_and_its_results_say_so(tmp_path, capsys):
    from selfsup.methods import METHODS, Method, StepOutput, register_method

    @register_method
    class CollapsingMethod(Method):
        """A method whose embeddings lie on one line when ``collapsed`` (test double, 2026)."""

        name = "collapsing_test_double"
        views = "simclr"

        def __init__(self, backbone, context, collapsed: bool = True) -> None:
            super().__init__(backbone, context)
            self.projector = torch.nn.Linear(context.feature_dim, 64)
            self.collapsed = collapsed

        def training_step(self, batch):
            features = self.backbone(batch.views[0])
            z = self.projector(features)
            if self.collapsed:  # every embedding a multiple of one vector
                z = z[:, :1] * self.projector.weight[:, 0]
            return StepOutput(z.pow(2).mean(), features=features, embeddings=[z])

    results = {}
    try:
        for collapsed in (True, False):
            out = tmp_path / str(collapsed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert main(["train", "--method", "collapsing_test_double", "--max-steps", "4",
                             "--out", str(out), "--no-eval", "--set",
                             f"method_args.collapsed={str(collapsed).lower()}", *TINY]) == 0
            results[collapsed] = json.loads((out / "results.json").read_text())
            results[collapsed]["warnings"] = [str(w.message) for w in caught]
    finally:
        METHODS.pop("collapsing_test_double")
    warning = results[True]["collapse_warning"]
    assert warning.startswith("epoch 0: the embeddings look collapsed: their effective rank "
                              "averaged 1.0 over the epoch, out of at most 32")
    assert warning in results[True]["warnings"]
    assert "collapse_warning" not in results[False]
    assert not any("collapsed" in w for w in results[False]["warnings"])
