"""The method contract: what the generic trainer knows about every method, and nothing more.

A method is an ``nn.Module`` with

- ``backbone``: the encoder that evaluation uses (for momentum methods: the online network, as
  the papers evaluate it);
- ``views``: the augmentation recipe it trains on (a name in ``selfsup.augment.RECIPES``) and
  ``num_views``; ``uses_view_boxes`` when it reads where each view lies in its image
  (``Batch.view_boxes``: PixPro's positive pixel pairs);
- ``training_step(batch) -> StepOutput``: the loss, values to log, the backbone features of the
  first view (the online linear probe reads them, detached) and the per-view embeddings (the
  collapse monitors read them);
- ``on_before_optimizer_step(epoch)``: after backward, before the step: cancel gradients (SwAV's
  prototypes in the first epoch);
- ``on_after_optimizer_step(progress)``: momentum updates, schedules (progress in [0, 1]);
- ``finetune_encoder(label_fraction)``: what fine-tuning trains under its linear head (the
  backbone, unless the method's paper says otherwise: SimCLR v2 keeps a projection-head layer);
- ``knn_bank()``: a bank of training-split features that kNN evaluation may read (InstDisc's
  memory bank), or None;
- ``state_dict()``: everything needed to resume exactly (queues, banks, EMA weights are persistent
  buffers or submodules).

Hyper-parameters are the keyword arguments of ``__init__``, typed and constrained with pydantic
annotations; their defaults are the paper's. The registry validates a config against that
signature, so a misspelt or out-of-range key is an error naming the key.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic
import torch
from torch import nn

from selfsup.errors import ConfigError


# ``factory(in_channels) -> (module, feature_dim)``: a fresh, randomly initialised encoder of the
# configured architecture (name, stem, width) for images of ``in_channels`` channels.
BackboneFactory = Callable[[int], tuple[nn.Module, int]]


@dataclass
class MethodContext:
    """What a method may need to know about the encoder and the data when it is built.

    ``image_mean`` / ``image_std``: the per-channel normalisation, in [0, 1] units, of the images
    the backbone receives (``(pixel - mean) / std``, from the training views and from evaluation
    alike), so a method can recover the pixels (CMC converts them to Lab). ``backbone_factory``
    builds more encoders like the backbone, with another number of input channels (CMC's one
    encoder per view); None where the caller gives none.
    """

    feature_dim: int
    num_samples: int
    num_classes: int
    image_size: int
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    backbone_factory: BackboneFactory | None = None


@dataclass
class Batch:
    """One training batch, after on-device augmentation.

    ``generator`` is seeded identically on every process for this step, so random choices a
    method makes (e.g. MoCo's shuffle) agree across processes and are reproducible on resume.
    ``epoch`` is the trainer's step counted in epochs (step / steps per epoch: 1.5 is the middle of
    the second epoch), for settings the papers switch by epoch (SwAV's queue); it derives from the
    checkpointed step, so it resumes exactly.

    ``view_boxes``: for a method with ``uses_view_boxes``, one float32 ``(N, 4)`` per view: the
    box of its source image that each sample's view shows, ``(x0, y0, x1, y1)`` in ``[0, 1]`` of
    the image's width and height, with ``x0 > x1`` where the view is mirrored (see
    ``selfsup.augment.ops.Op.source_boxes``); None for the other methods.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor | None
    index: torch.Tensor
    generator: torch.Generator
    epoch: float = 0.0
    view_boxes: list[torch.Tensor] | None = None


@dataclass
class StepOutput:
    """What a training step returns.

    ``features``: backbone features of the first view (the online probe reads them, detached).
    ``embeddings``: the per-view outputs the loss compares (projections); the trainer logs the
    collapse monitors of ``selfsup.evaluate.metrics`` on them.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    features: torch.Tensor | None = None
    embeddings: list[torch.Tensor] | None = None


class Method(nn.Module):
    """Base class of every method. Subclasses set ``name``, ``views`` and implement
    ``training_step``; the docstring of each cites its paper."""

    name: ClassVar[str]
    views: ClassVar[str]
    num_views: ClassVar[int] = 2
    # Whether training_step reads Batch.view_boxes; the trainer records them for such methods only.
    uses_view_boxes: ClassVar[bool] = False
    # The paper's optimizer settings (keys of ``selfsup.config.OptimConfig``); configs override.
    default_optimizer: ClassVar[dict[str, Any]] = {}
    # Submodules whose learning rate stays at its base value instead of following the schedule
    # (SimSiam's predictor, Chen & He 2021, Section 4.1).
    fixed_lr_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: nn.Module, context: MethodContext) -> None:
        super().__init__()
        self.backbone = backbone
        self.context = context

    def training_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def on_before_optimizer_step(self, epoch: float) -> None:
        """Called after backward (gradients already reduced across processes) and before the
        optimizer step, with the step counted in epochs as in ``Batch.epoch``; a gradient set to
        None here leaves its parameter, and its optimizer state, untouched by the step."""

    def on_after_optimizer_step(self, progress: float) -> None:
        """Called once after every optimizer step; momentum methods update their copies here."""

    def finetune_encoder(self, label_fraction: float) -> nn.Module:
        """The network fine-tuning puts a linear classifier on, for ``label_fraction`` of the
        labels; it shares this method's weights (``selfsup eval finetune`` trains a copy). The
        backbone here; SimCLR v2 adds the first layer of its projection head."""
        return self.backbone

    def knn_bank(self) -> tuple[torch.Tensor, nn.Module] | None:
        """Reference features that kNN evaluation reads instead of encoding the training split:
        ``(bank, encoder)``, row i of ``bank`` for sample i of the training split and ``encoder``
        mapping images into the bank's space (InstDisc's memory bank, Wu et al. 2018,
        Section 3.4). None, the default: the method keeps no such bank."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def _hyperparameter_model(cls: type[Method]) -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {}
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    # Skip self, backbone and context: the rest are the hyper-parameters.
    parameters = list(inspect.signature(cls.__init__).parameters.values())[3:]
    for parameter in parameters:
        fields[parameter.name] = (hints.get(parameter.name, Any), parameter.default)
    return pydantic.create_model(f"{cls.__name__}Hyperparameters",
                                 __config__=pydantic.ConfigDict(extra="forbid", strict=False),
                                 **fields)


def method_hyperparameters(name: str) -> dict[str, Any]:
    """The paper-default hyper-parameters of a method, as ``{name: default}``."""
    model = _hyperparameter_model(get_method_class(name))
    return {key: info.default for key, info in model.model_fields.items()}


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method={name!r} is not a known method; choose one of "
                          f"{', '.join(method_names())}")
    return METHODS[name]


def validate_hyperparameters(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` against the method's signature; errors name ``method_args.<key>``."""
    model = _hyperparameter_model(get_method_class(name))
    try:
        return model(**values).model_dump()
    except pydantic.ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"])
            if item["type"] == "extra_forbidden":
                allowed = ", ".join(model.model_fields)
                problems.append(f"method_args.{key} is not a parameter of {name} "
                                f"(allowed: {allowed})")
            else:
                problems.append(f"method_args.{key}: {item['msg']} (got {item.get('input')!r})")
        raise ConfigError("; ".join(problems)) from None


def build_method(name: str, backbone: nn.Module, context: MethodContext,
                 hyperparameters: dict[str, Any] | None = None) -> Method:
    values = validate_hyperparameters(name, hyperparameters or {})
    return get_method_class(name)(backbone, context, **values)

