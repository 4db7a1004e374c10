"""The output folder of a training run: what a run writes there, and what it may replace.

``selfsup train`` writes only under ``--out``: ``results.json``, ``loss.png``, ``checkpoints/``
and ``logs/``. A folder that already holds an earlier run's results is not trained into by
accident, since the new run would mix its checkpoints and logs with the old ones and write over
the old results: it is refused unless the run resumes (``--resume``) or is told to replace the
earlier run (``--overwrite``). Files in the folder that selfsup did not write are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from selfsup.errors import ConfigError

# Everything a run writes under OUT; the first three mean "an earlier run was here".
RUN_OUTPUTS: tuple[str, ...] = ("results.json", "checkpoints", "logs", "loss.png")
EARLIER_RUN_SIGNS: tuple[str, ...] = ("results.json", "checkpoints", "logs")


def prepare_out_dir(out: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Check ``out`` before a run writes to it.

    - no earlier run there: nothing to do;
    - an earlier run and ``resume`` set: it is continued, nothing is removed;
    - an earlier run and ``overwrite``: its outputs (``RUN_OUTPUTS`` only) are removed;
    - an earlier run and neither: :class:`ConfigError` naming the folder and both flags.

    Only the first process checks and removes: under DDP the other processes start after it.
    """
    out = Path(out)
    if rank_zero_only.rank != 0:
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    found = [name for name in EARLIER_RUN_SIGNS if (out / name).exists()]
    if not found or resume is not None:
        return
    if not overwrite:
        raise ConfigError(
            f"--out {out}: holds an earlier run ({', '.join(found)}); pass --resume auto to "
            "continue it, or --overwrite to replace it (or choose another --out)")
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()  # a link is removed, never followed
        elif path.is_dir():
            shutil.rmtree(path)
