"""Typed run configuration: pydantic models, YAML files read with a safe loader, and overrides.

Resolution order (later wins): the defaults below, the method's paper optimizer
(``Method.default_optimizer``), a YAML file (``--config``), then command-line options and
``--set key.sub=value``. Unknown keys, wrong types and out-of-range values are errors that name the
key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt)

from selfsup.errors import ConfigError
from selfsup.precision import Precision


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = "cifar10-sample"
    image_size: PositiveInt | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    num_workers: NonNegativeInt = 2
    download: bool = False
    # Leave out (and count) images that cannot be decoded, empty class folders and bad rows of a
    # list file, instead of stopping at the first one.
    skip_bad: bool = False


class BackboneConfig(_Section):
    name: str = "resnet18"
    # None: the CIFAR stem for images of 64 px or less, the ImageNet stem above.
    cifar_stem: bool | None = None
    width: float = Field(1.0, gt=0.0)


class OptimConfig(_Section):
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    # Base learning rate for a global batch of 256; scaled by ``lr_scaling`` to the real batch.
    lr: float = Field(0.03, gt=0.0)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: NonNegativeFloat = 1e-4
    # None: constant weight decay. A value: the weight decay follows a cosine from
    # ``weight_decay`` at the first step to this at the last (DINO's 0.04 -> 0.4).
    weight_decay_end: NonNegativeFloat | None = None
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: NonNegativeFloat = 0.0
    # LARS (You et al. 2017) as SimCLR uses it: biases and norm weights get neither the trust
    # ratio nor weight decay.
    trust_coefficient: float = Field(0.001, gt=0.0)
    exclude_bias_and_norm: bool = True


class TrainConfig(_Section):
    epochs: PositiveInt | None = 100
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 256
    seed: int = 0
    # "auto": bf16 autocast where the device computes bf16 natively, float32 elsewhere.
    precision: Precision = "32"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: PositiveInt = 1
    num_nodes: PositiveInt = 1
    checkpoint_every: PositiveInt | None = None
    keep_checkpoints: PositiveInt = 3
    out: str = "runs/selfsup"
    resume: str | None = None
    # Replace an earlier run's outputs in ``out`` (otherwise a run refuses a folder holding one).
    overwrite: bool = False
    log_every: PositiveInt = 10
    channels_last: bool = False
    # Steps whose loss is NaN or inf that may be skipped (no update; buffers such as queues and
    # BN statistics restored) before the run stops; 0 stops at the first one.
    max_nonfinite_skips: NonNegativeInt = 0
    # Batch statistics over all processes (selfsup.distributed.GlobalBatchNorm; any backend).
    sync_batchnorm: bool = False
    progress_bar: bool = True


class EvalConfig(_Section):
    knn_k: PositiveInt = 200
    knn_temperature: float = Field(0.1, gt=0.0)
    online_probe: bool = True
    online_probe_lr: float = Field(1e-3, gt=0.0)
    monitor_every_n_epochs: NonNegativeInt = 1
    monitor_bank_size: PositiveInt = 10_000
    after_training: list[Literal["knn", "linear"]] = ["knn", "linear"]
    linear_steps: PositiveInt = 300
    linear_lrs: list[float] = [1e-3, 1e-2]
    linear_weight_decays: list[float] = [0.0, 1e-5, 1e-4, 1e-3]
    batch_size: PositiveInt = 512
    # Fine-tuning (``selfsup eval finetune``, SimCLR Appendix B.5): learning rates per 256
    # images, chosen on the validation split, around the paper's 0.05; None epochs: the
    # paper's 60 for 1% of the labels, 30 for more.
    finetune_lrs: list[PositiveFloat] = Field([0.01, 0.05, 0.1], min_length=1)
    finetune_epochs: PositiveInt | None = None
    finetune_batch_size: PositiveInt = 256


class Config(_Section):
    method: str = "simclr"
    method_args: dict[str, Any] = {}
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


def _format_validation_error(error: pydantic.ValidationError, origin: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not isinstance(part, int)) or "<root>"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown config key {key!r}")
        else:
            problems.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return f"{origin}: " + "; ".join(problems)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no python tags, no object construction)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), with the value read as a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(overrides: dict[str, Any], texts: list[str]) -> None:
    """Set every ``KEY=VALUE`` of ``texts`` (``--set`` flags) in ``overrides``."""
    for text in texts:
        path, value = parse_override(text)
        set_dotted(overrides, path, value)


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "method_args":
            merged[key] = deep_update(merged[key], value)
        elif isinstance(value, dict) and key == "method_args":
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def set_dotted(values: dict[str, Any], path: list[str], value: Any) -> None:
    node = values
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def resolve_config(file_values: dict[str, Any] | None = None,
                   overrides: dict[str, Any] | None = None, origin: str = "config") -> Config:
    """Merge defaults, the method's paper optimizer, a file's values and overrides; validate."""
    from selfsup.methods import get_method_class, validate_hyperparameters

    merged = deep_update(file_values or {}, overrides or {})
    method = merged.get("method", Config().method)
    if not isinstance(method, str):
        raise ConfigError(f"{origin}: method must be a method name, got {method!r}")
    method_class = get_method_class(method)
    defaults: dict[str, Any] = {"optim": dict(method_class.default_optimizer)}
    merged = deep_update(defaults, merged)
    try:
        config = Config(**merged)
    except pydantic.ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None
    config.method_args = validate_hyperparameters(config.method, config.method_args)
    if config.train.epochs is None and config.train.max_steps is None:
        raise ConfigError(f"{origin}: set train.epochs or train.max_steps")
    return config
