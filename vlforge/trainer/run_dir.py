"""A run directory holds one run. Training into one that already holds a run continues it
(`trainer.resume`), replaces it (`trainer.overwrite=true`), or is refused before anything is written:
old checkpoints, appended metrics and a reused wandb run id would otherwise mix two runs."""
from __future__ import annotations

import shutil
from pathlib import Path

from vlforge.core.checkpoints import complete_checkpoints
from vlforge.core.errors import ConfigError

# Kept by an overwrite: Hydra's record of this launch (written before the run starts) and the ranks'
# logs, which every rank has already opened for appending.
_KEPT = (".hydra", "logs")


def previous_run(run_dir: Path) -> list[str]:
    """What an earlier run left in `run_dir`, described; empty when it holds no run."""
    found = []
    ckpt_dir = run_dir / "checkpoints"
    steps = [step for step, _ in complete_checkpoints(ckpt_dir)] if ckpt_dir.is_dir() else []
    if steps:
        found.append(f"checkpoints up to step {steps[-1]}")
    elif ckpt_dir.is_dir() and any(ckpt_dir.glob("step_*")):
        found.append("an interrupted checkpoint")
    found += [name for name in ("metrics.jsonl", "wandb_id.txt") if (run_dir / name).exists()]
    return found


def claim_run_dir(run_dir: Path, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Raise a ConfigError if `run_dir` holds a run that this one would neither continue nor replace;
    with `overwrite`, rank 0 deletes that run (everything but Hydra's record and the logs)."""
    if overwrite and resume:
        raise ConfigError(f"trainer.overwrite=true starts {run_dir} clean and trainer.resume={resume} continues "
                          "it: set one of them")
    left = previous_run(run_dir)
    if not left or resume:
        return
    if not overwrite:
        raise ConfigError(
            f"run directory {run_dir.resolve()} already holds a run ({', '.join(left)}): add trainer.resume=auto "
            "to continue it, give this run another name (name=... or run_dir=...), or add trainer.overwrite=true "
            "to delete it and start clean"
        )
    if is_main:
        for entry in run_dir.iterdir():
            if entry.name in _KEPT:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
