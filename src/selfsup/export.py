"""Export a trained backbone as safetensors, and load it back without pickle.

``export_backbone`` takes a training checkpoint (read with ``weights_only=True``), keeps the
online backbone, the network evaluation uses, and writes its ``state_dict`` with
``safetensors``: a JSON header plus raw tensor bytes, with nothing to unpickle, so reading
an exported file cannot run code. What is needed to rebuild the network is stored beside the
weights as string metadata:

=================  ==========================================================================
``format``         ``selfsup-backbone`` (``format_version`` ``1``)
``method``         the pretraining method, e.g. ``mocov2``
``backbone``       the name given to :func:`selfsup.backbones.build_backbone`
``width``          its channel multiplier (JSON number)
``cifar_stem``     ``true`` / ``false`` (JSON)
``feature_dim``    the feature size (JSON number)
``image_size``     side of the training images (JSON number)
``mean``, ``std``  per-channel normalisation of the inputs, in [0, 1] units (JSON lists)
``selfsup_version``  the version that wrote the file
=================  ==========================================================================

``load_backbone(path)`` rebuilds the network from that metadata and loads the weights strictly.
"""

from __future__ import annotations

import json
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from selfsup.errors import CheckpointError, ConfigError

FORMAT = "selfsup-backbone"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"


def _selfsup_version() -> str:
    try:
        return package_metadata.version("selfsup")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def export_backbone(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the online backbone of ``checkpoint`` to ``out`` (``FILE.safetensors``).

    The file is written atomically, and only after the same rebuild that :func:`load_backbone`
    does has succeeded on its contents. Returns the metadata written, plus ``weights``: the path.
    """
    from selfsup.checkpoint import atomic_write

    out = Path(out)
    if out.suffix != SUFFIX:
        raise ConfigError(f"--out {out}: exported weights are safetensors; name the file "
                          f"FILE{SUFFIX}")
    from selfsup.checkpoint import method_from_checkpoint
    from selfsup.train import resolved_cifar_stem

    config, info, method = method_from_checkpoint(checkpoint)
    cifar_stem = resolved_cifar_stem(config, info)
    tensors = {name: value.detach().cpu().contiguous()
               for name, value in method.backbone.state_dict().items()}
    fields: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": config.method,
        "backbone": config.backbone.name, "width": config.backbone.width,
        "cifar_stem": bool(cifar_stem), "feature_dim": method.context.feature_dim,
        "image_size": info["image_size"], "mean": list(info["mean"]), "std": list(info["std"]),
        "selfsup_version": _selfsup_version(),
    }
    header = {key: value if isinstance(value, str) else json.dumps(value)
              for key, value in fields.items()}
    _rebuild(header, tensors, str(checkpoint))  # what cannot be loaded back is never written
    payload = safetensors_bytes(tensors, metadata=header)
    atomic_write(out, lambda stream: stream.write(payload))
    return {"weights": str(out), **fields}


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of an exported backbone (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: exported backbone not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # SafetensorError, OSError, ...: not a safetensors file
        raise CheckpointError(f"{path}: not a safetensors file ({type(error).__name__}: "
                              f"{str(error)[:200]}); selfsup export writes FILE{SUFFIX}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a backbone exported by selfsup (metadata format "
                              f"{header.get('format')!r}, expected {FORMAT!r})")
    return header


def load_backbone(path: str | Path) -> tuple[nn.Module, int]:
    """Load a backbone written by ``selfsup export``; returns ``(module, feature_dim)``.

    The network is rebuilt with :func:`selfsup.backbones.build_backbone` from the file's
    metadata and its weights are loaded strictly; the module is returned in eval mode. Nothing
    is unpickled: safetensors holds only tensors and strings.
    """
    header = read_export_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable tensors ({type(error).__name__}: "
                              f"{str(error)[:200]})") from None
    return _rebuild(header, tensors, str(path))


def _rebuild(header: dict[str, str], tensors: dict[str, torch.Tensor], source: str
             ) -> tuple[nn.Module, int]:
    from selfsup.backbones import build_backbone

    try:
        name = header["backbone"]
        width = float(json.loads(header["width"]))
        cifar_stem = json.loads(header["cifar_stem"])
        feature_dim = int(json.loads(header["feature_dim"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: export metadata incomplete or malformed "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(cifar_stem, bool):
        raise CheckpointError(f"{source}: export metadata cifar_stem must be true or false")
    try:
        module, built_dim = build_backbone(name, cifar_stem=cifar_stem, width=width)
    except ConfigError as error:  # an unknown backbone name or width in the metadata
        raise CheckpointError(f"{source}: cannot rebuild the backbone: {error}") from None
    if built_dim != feature_dim:
        raise CheckpointError(f"{source}: {name} (width {width}) gives {built_dim}-d features, "
                              f"the metadata says {feature_dim}")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: weights do not fit {name} (width {width}, cifar_stem "
                              f"{cifar_stem}): {str(error).splitlines()[0]}") from None
    return module.eval(), feature_dim
