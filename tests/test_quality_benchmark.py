"""benchmarks/quality.py's epoch choice and verdict (no lightly, no training)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # quality.py imports lightly_recipes beside it
        patch.setitem(sys.modules, "lightly", None)  # it must import without lightly
        spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_the_epoch_is_chosen_on_validation_never_on_test(quality):
    epochs = [{"val": 0.30, "test": 0.40}, {"val": 0.35, "test": 0.31}, {"val": 0.33, "test": 0.50}]
    assert quality.chosen(epochs) == {"epoch": 2, "val": 0.35, "test": 0.31}


def test_a_tie_goes_to_the_earliest_epoch(quality):
    assert quality.choose_epoch([0.2, 0.4, 0.4, 0.1]) == 2
    with pytest.raises(ValueError):
        quality.choose_epoch([])


def test_target_is_met_only_at_or_above_lightly_and_the_table_prints_the_difference(quality):
    assert "met" in quality.verdict(0.40, 0.40)
    assert "MISSED" in quality.verdict(0.39, 0.40)
    side = lambda val, test, seconds: {  # noqa: E731
        "epochs": [{"val": val, "test": test}], "random_init": {"val": 0.3, "test": 0.3},
        "chosen": {"epoch": 1, "val": val, "test": test}, "train_seconds": seconds}
    text = quality.table({"ours": side(0.42, 0.41, 10.0), "lightly": side(0.40, 0.39, 30.0)})
    assert "ours - lightly +2.00 points" in text
    assert "3.00x" in text and ": met" in text
    assert "ours +11.00 points, lightly +9.00 points" in text  # lifts over random init (30%)


def test_every_lightly_recipe_has_our_method_and_our_cifar10_config_beside_it(quality):
    from selfsup.methods import get_method_class

    assert {"simclr", "byol", "simsiam", "swav", "dino"} <= set(quality.LIGHTLY_RECIPES)
    for name in quality.LIGHTLY_RECIPES:
        assert get_method_class(name).name == name
        assert quality.our_recipe(name).is_file(), name


def test_our_side_takes_the_runs_scale_and_the_set_overrides(quality, tmp_path):
    args = quality.argparse.Namespace(
        method="swav", workers=1, width=0.25, cifar_stem=False, epochs=2, batch_size=64,
        seed=0, device="cpu", work_dir=tmp_path, warmup_epochs=1.0,
        set=["method_args.num_local_crops=0", "optim.lr=0.3"])
    config = quality.our_config(quality.SAMPLE, args)
    assert (config.method, config.backbone.width, config.train.batch_size) == ("swav", 0.25, 64)
    assert config.method_args["num_local_crops"] == 0 and config.optim.lr == 0.3
    # The rest is configs/swav_cifar10.yaml's.
    assert config.method_args["num_prototypes"] == 3000 and config.optim.name == "lars"
