"""Checkpoint files: atomic writes, safe loads, and the ``--resume`` lookup.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target, so a
crash never leaves half a checkpoint under the real name. Loads use ``torch.load(...,
weights_only=True)``: a checkpoint that would need arbitrary unpickling is refused, never run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from selfsup.errors import CheckpointError


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint as plain data; refuse anything that would execute code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(
                f"{path}: refused: loading it would need arbitrary unpickling, which can run "
                f"code. Only plain tensors, numbers, strings, lists and dicts are loaded "
                f"({reason[:200]})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{reason[:200]}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a selfsup checkpoint (top level is not a dict)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None
                        ) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location or "cpu")


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> str | None:
    """``auto`` -> the last checkpoint in ``checkpoint_dir`` if any; a path -> that path."""
    if resume is None:
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise CheckpointError(f"--resume {resume}: checkpoint file not found")
    return resume
