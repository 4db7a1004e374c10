"""Config resolution and the command line: clear errors that name the key or option at fault."""

import json
from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.config import resolve_config, read_yaml
from selfsup.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_method_paper_optimizer_is_the_default_and_files_and_flags_override_it():
    simclr = resolve_config({"method": "simclr"})
    assert (simclr.optim.name, simclr.optim.lr, simclr.optim.weight_decay) == ("lars", 0.3, 1e-6)
    moco = resolve_config({"method": "mocov2"})
    assert (moco.optim.name, moco.optim.lr) == ("sgd", 0.03)
    assert moco.method_args["queue_size"] == 4096 and moco.method_args["momentum"] == 0.99
    assert moco.method_args["temperature"] == 0.2
    overridden = resolve_config({"method": "mocov2", "optim": {"lr": 0.5}},
                                {"optim": {"weight_decay": 0.0}})
    assert (overridden.optim.lr, overridden.optim.weight_decay) == (0.5, 0.0)


@pytest.mark.parametrize("values, key", [
    ({"trian": {"epochs": 1}}, "trian"),
    ({"train": {"epochs": 1, "batchsize": 3}}, "train.batchsize"),
    ({"train": {"batch_size": "many"}}, "train.batch_size"),
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({"method": "simclr", "method_args": {"temperature": -0.1}}, "method_args.temperature"),
    ({"method": "nope"}, "nope"),
])
def test_config_errors_name_the_key_at_fault(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(values)


def test_yaml_with_python_tags_is_refused_without_constructing_anything(tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(f"method: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="hostile.yaml"):
        read_yaml(hostile)
    assert not marker.exists()


def test_every_shipped_config_is_valid():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ holds one YAML per recipe"
    for path in configs:
        resolve_config(read_yaml(path), origin=str(path))


def test_cli_unknown_option_is_an_error_naming_it(capsys):
    assert main(["train", "--epochz", "3"]) == 2
    assert "--epochz" in capsys.readouterr().err


def test_cli_unknown_config_key_is_an_error_naming_it(capsys):
    assert main(["train", "--set", "optim.lrr=0.1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_cli_bad_data_spec_is_a_one_line_error_naming_it(capsys, tmp_path):
    assert main(["train", "--data", "imagenet-typo", "--max-steps", "1",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "imagenet-typo" in err and "Traceback" not in err


def test_cli_methods_json_lists_simclr_and_mocov2(capsys):
    assert main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["methods"]
    assert table["mocov2"]["hyperparameters"]["queue_size"] == 4096
    assert table["simclr"]["views"] == "simclr"


def test_cli_eval_refuses_a_missing_checkpoint(capsys, tmp_path):
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "none.ckpt" in capsys.readouterr().err
