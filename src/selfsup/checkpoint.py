"""Checkpoint files: atomic writes, safe loads, and the ``--resume`` lookup.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target, so a
crash never leaves half a checkpoint under the real name. Loads use ``torch.load(...,
weights_only=True)``: a checkpoint that would need arbitrary unpickling is refused, never run.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from selfsup.errors import CheckpointError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(stream)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    A reader sees the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
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


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda stream: torch.save(obj, stream))


def _refusal_reason(message: str) -> str | None:
    """What a weights-only load objected to, or None when the failure is something else.

    torch's own message starts by suggesting ``weights_only=False``, which is exactly what must
    not be done with a file from a stranger; only the objection itself is kept.
    """
    if "weights only" not in message.lower() and "weights_only" not in message:
        return None
    found = re.search(r"Unsupported (global|operand):? (?:GLOBAL )?([^\s,]+)", message)
    if found is None:
        return "it asks for something outside the weights-only allow-list"
    return f"it asks for the {found.group(1)} {found.group(2)}"


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False
                         ) -> dict[str, Any]:
    """Load a checkpoint as plain data; refuse anything that would execute code.

    ``mmap=True`` maps the tensors instead of reading them: cheap when a few fields are needed.

    Only tensors, numbers, strings, lists and dicts are rebuilt (``torch.load(...,
    weights_only=True)``). A file that asks for any other global (``os.system``, ``exec``, a
    class with a ``__reduce__``...) is refused with a :class:`CheckpointError` naming it; nothing
    it holds is run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        message = str(error).strip()
        refused = _refusal_reason(message)
        if refused is not None:
            raise CheckpointError(
                f"{path}: refused: loading it would need arbitrary unpickling ({refused}), "
                "which can run code. selfsup loads only tensors, numbers, strings, lists and "
                "dicts from a checkpoint; nothing in this file was run") from None
        reason = message.splitlines()[0] if message else type(error).__name__
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


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that ``path`` is a whole, uncorrupted training checkpoint; return it memory-mapped.

    ``torch.save`` writes a zip archive with a CRC-32 per record; every record is read back and
    checked, so a truncated file (no central directory) or flipped bits (a CRC mismatch) are
    caught here, not as garbage weights later. Raises :class:`CheckpointError` saying what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: torn or corrupt checkpoint ({error})") from None
    except Exception as error:  # zlib and struct errors on a mangled archive
        raise CheckpointError(f"{path}: torn or corrupt checkpoint "
                              f"({type(error).__name__}: {error})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC-32 mismatch in record {damaged})")
    checkpoint = load_checkpoint_file(path, mmap=True)
    missing = [key for key in ("state_dict", "global_step", "hyper_parameters")
               if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a selfsup training checkpoint "
                              f"(missing {', '.join(missing)})")
    return checkpoint


def _step_of(path: Path) -> int:
    digits = path.stem[len("step"):]
    return int(digits) if digits.isdigit() else -1


def resume_candidates(checkpoint_dir: Path) -> list[Path]:
    """``last.ckpt``, then the step checkpoints newest first: the order ``--resume auto`` tries."""
    steps = sorted(checkpoint_dir.glob("step*.ckpt"), key=_step_of, reverse=True)
    last = checkpoint_dir / "last.ckpt"
    return ([last] if last.is_file() else []) + [p for p in steps if _step_of(p) >= 0]


# What must match for a checkpoint to continue this run: the weights' shapes and meaning.
_IDENTITY_KEYS = ("method", "method_args", "backbone")


def check_same_model(checkpoint: dict[str, Any], path: Path, config: dict[str, Any]) -> None:
    """Refuse a checkpoint made for another method, method arguments or backbone."""
    saved = checkpoint["hyper_parameters"].get("config", {})
    for key in _IDENTITY_KEYS:
        if saved.get(key) != config.get(key):
            raise CheckpointError(
                f"{path}: made by a run with {key} = {saved.get(key)!r}, but this run has "
                f"{key} = {config.get(key)!r}; resume with the config that made it, or train "
                "into a new --out folder")


def resolve_resume(resume: str | None, checkpoint_dir: Path, config: dict[str, Any],
                   warn: Callable[[str], None] = print) -> str | None:
    """The checkpoint to resume from, verified (see :func:`verify_checkpoint`), or None.

    ``auto``: the newest good checkpoint in ``checkpoint_dir`` (None when there is none yet); a
    damaged one is skipped with a message through ``warn`` naming it and the one used instead.
    A path: that file, which must be good. Either way a checkpoint of another method or backbone
    (``config`` is this run's config as a dict) is refused.
    """
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: checkpoint file not found")
        check_same_model(verify_checkpoint(path), path, config)
        return resume
    damaged: list[str] = []
    for path in resume_candidates(checkpoint_dir):
        try:
            checkpoint = verify_checkpoint(path)
        except CheckpointError as error:
            damaged.append(str(error))
            continue
        check_same_model(checkpoint, path, config)
        if damaged:
            warn(f"selfsup: skipped damaged checkpoint(s): {'; '.join(damaged)}. "
                 f"Resuming from {path} (step {checkpoint['global_step']}).")
        return str(path)
    if damaged:
        raise CheckpointError(f"--resume auto: no usable checkpoint in {checkpoint_dir}: "
                              + "; ".join(damaged))
    return None


def method_from_checkpoint(path: str | Path):
    """Rebuild the pretraining method of a selfsup training checkpoint, with its weights.

    Returns ``(config, data_info, method)``. The file is read with ``weights_only=True``.
    """
    from selfsup.config import Config
    from selfsup.train import build_pretraining_method

    checkpoint = load_checkpoint_file(path)
    try:
        hyper = checkpoint["hyper_parameters"]
        config = Config(**hyper["config"])
        info = hyper["data_info"]
        state = {key[len("method."):]: value for key, value in checkpoint["state_dict"].items()
                 if key.startswith("method.")}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{path}: not a selfsup training checkpoint "
                              "(no selfsup config inside)") from None
    method = build_pretraining_method(config, info)
    try:
        method.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit {config.method} with "
                              f"{config.backbone.name}: {str(error).splitlines()[0]}") from None
    return config, info, method
