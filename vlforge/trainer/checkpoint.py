"""Checkpoints: DeepSpeed's sharded states plus, per rank, RNG and data position; complete or ignored.

A checkpoint directory `checkpoints/step_00000100/` counts only once `complete.json` is in it, which
rank 0 writes after every rank has finished writing. A run killed mid-save leaves a directory without
it, which resume skips and the next save removes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlforge.core.checkpoints import COMPLETE, complete_checkpoints, tag_for
from vlforge.core.distributed import DistEnv
from vlforge.core.errors import CheckpointError
from vlforge.trainer.engine import TrainingEngine

log = logging.getLogger(__name__)


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """trainer.resume: null -> None; 'auto' -> newest complete checkpoint (or None); else that path."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"trainer.resume={resume}: not a complete checkpoint directory (no {COMPLETE})")
    return path


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, writer: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    writer(tmp)
    os.replace(tmp, path)


def save_checkpoint(engine: TrainingEngine, ckpt_dir: Path, step: int, rank_state: dict[str, Any], dist_env: DistEnv, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's directory."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    if (path / COMPLETE).is_file():
        return path
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    _atomic_write(path / f"rank_{dist_env.rank:05d}.pt", lambda tmp: torch.save(rank_state, tmp))
    _barrier()
    if dist_env.is_main:
        info = {"step": step, "world_size": dist_env.world_size, "time": time.time()}
        _atomic_write(path / COMPLETE, lambda tmp: tmp.write_text(json.dumps(info)))
        _prune(ckpt_dir, keep_last, current=path)
    _barrier()
    return path


def _prune(ckpt_dir: Path, keep_last: int, current: Path) -> None:
    complete = [p for _, p in complete_checkpoints(ckpt_dir)]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for path in ckpt_dir.glob("step_*"):
        if path != current and not (path / COMPLETE).exists() and path.name < current.name:
            log.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine: TrainingEngine, path: Path, dist_env: DistEnv) -> tuple[int, dict[str, Any] | None]:
    """Restore model, optimizer and schedule; return (step, this rank's RNG/data state or None)."""
    info = json.loads((path / COMPLETE).read_text())
    loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint at {path}")
    rank_file = path / f"rank_{dist_env.rank:05d}.pt"
    if info["world_size"] != dist_env.world_size or not rank_file.is_file():
        log.warning(
            "checkpoint %s was written by %d ranks, this run has %d: weights and optimizer are restored, "
            "RNG and data position start afresh", path, info["world_size"], dist_env.world_size,
        )
        return int(client["step"]), None
    return int(client["step"]), torch.load(rank_file, weights_only=False)
