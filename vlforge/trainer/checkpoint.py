"""Checkpoints: DeepSpeed's sharded states plus, per rank, RNG and data position; whole or absent.

Every rank writes under `checkpoints/step_N.partial/`; once all have, rank 0 writes `complete.json`
there, renames the directory to `step_N/` (one atomic rename) and then moves DeepSpeed's `latest`
pointer. An old checkpoint is renamed to `step_N.deleting/` before it is removed. A process killed at
any point of a save therefore leaves either the whole `step_N/` or none of it, and resume never reads
a part; leftovers are removed by the next save. A full disk ends the save with a `CheckpointError`
naming the path and the space a checkpoint needs, its partial files removed and the previous
checkpoint untouched.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from vlforge.core.checkpoints import COMPLETE, complete_checkpoints, consolidated_state_dict, is_complete, tag_for
from vlforge.core.distributed import DistEnv
from vlforge.core.errors import CheckpointError
from vlforge.trainer.engine import TrainingEngine
from vlforge.trainer.faults import kill_at_save_point, raise_if_disk_full

log = logging.getLogger(__name__)


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """trainer.resume: null -> None; 'auto' -> newest complete checkpoint (or None); else that path."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not is_complete(path):
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


PARTIAL, DELETING, LATEST = ".partial", ".deleting", "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, writer: Any, before_replace: Any = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    writer(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)


def _megabytes(path: Path) -> float:
    files = [path] if path.is_file() else path.rglob("*")
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def _is_write_failure(err: BaseException) -> bool:
    # torch.save reports a failed write as a RuntimeError from its zip writer, without the errno.
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and any(
        mark in str(err) for mark in ("inline_container", "PytorchStreamWriter", "file write failed")))


@contextmanager
def _write_failure_reported(ckpt_dir: Path, partial: Path, step: int) -> Iterator[None]:
    """A write that fails (a full disk, above all) removes the partial save and raises a
    CheckpointError that names the directory, the space free and the space a checkpoint needs."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not _is_write_failure(err):
            raise
        written = _megabytes(partial) if partial.exists() else 0.0
        # What the partial save holds is free again once it is removed and the failed write's file is
        # closed (which happens only after this exception is gone).
        free = shutil.disk_usage(ckpt_dir).free / 2**20 + written
        shutil.rmtree(partial, ignore_errors=True)
        previous = complete_checkpoints(ckpt_dir)
        need = max(written, _megabytes(previous[-1][1])) if previous else written
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < need
        kept = (f"the previous checkpoint {previous[-1][1]} is intact (trainer.resume=auto continues from it)"
                if previous else "there is no earlier checkpoint")
        raise CheckpointError(
            f"checkpoint of step {step}: {'the disk is full' if full else 'a write failed'} ({err}); a checkpoint "
            f"of this run needs about {need:.1f} MiB and {free:.1f} MiB are free under {ckpt_dir.resolve()} with "
            f"the partial save removed; {kept}."
            + (" Free space there (or lower trainer.keep_last), then rerun." if full else "")
        ) from err


def save_checkpoint(engine: TrainingEngine, ckpt_dir: Path, step: int, rank_state: dict[str, Any], dist_env: DistEnv, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's directory."""
    tag = tag_for(step)
    final, partial = ckpt_dir / tag, ckpt_dir / (tag + PARTIAL)
    if is_complete(final):
        return final
    if dist_env.is_main and partial.exists():
        shutil.rmtree(partial)  # a save of this step that was killed
    _barrier()
    rank = dist_env.rank
    with _write_failure_reported(ckpt_dir, partial, step):
        raise_if_disk_full(step, rank, str(partial))
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state={"step": step}, save_latest=False)
        _atomic_write(partial / f"rank_{rank:05d}.pt", lambda tmp: torch.save(rank_state, tmp),
                      before_replace=lambda: kill_at_save_point("rank_file", step, rank))
        _barrier()
        kill_at_save_point("before_complete", step, rank)
        if dist_env.is_main:
            info = {"step": step, "world_size": dist_env.world_size, "time": time.time()}
            _atomic_write(partial / COMPLETE, lambda tmp: tmp.write_text(json.dumps(info)))
    if dist_env.is_main:
        kill_at_save_point("before_rename", step, rank)
        os.rename(partial, final)
        _fsync_dir(ckpt_dir)
        kill_at_save_point("before_latest", step, rank)
        _atomic_write(ckpt_dir / LATEST, lambda tmp: tmp.write_text(tag))  # DeepSpeed's tools read it
        _prune(ckpt_dir, keep_last, step, rank)
    _barrier()
    return final


def _remove(path: Path, step: int, rank: int) -> None:
    doomed = path if path.name.endswith(DELETING) else path.rename(path.with_name(path.name + DELETING))
    first = next((f for f in sorted(doomed.iterdir()) if f.is_file()), None)
    if first is not None:
        first.unlink()
        kill_at_save_point("prune", step, rank)
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(ckpt_dir: Path, keep_last: int, step: int, rank: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove the rest and whatever a killed save or
    removal left behind."""
    complete = [p for _, p in complete_checkpoints(ckpt_dir)]
    for old in complete[:-keep_last]:
        _remove(old, step, rank)
    for left in ckpt_dir.glob("step_*"):
        if left.is_dir() and not is_complete(left) and left.name != tag_for(step) + PARTIAL:
            log.warning("removing %s, left by an interrupted save or removal", left)
            _remove(left, step, rank)


UNIVERSAL = "universal"


def written_by(path: Path) -> int:
    """The number of ranks that wrote the checkpoint at `path`."""
    return int(json.loads((path / COMPLETE).read_text())["world_size"])


def universal_checkpoint(path: Path, dist_env: DistEnv) -> Path:
    """Collective. DeepSpeed's universal form of the checkpoint at `path` (parameters and optimizer
    state per parameter, loadable by any number of ranks), converted once by rank 0 into
    `path/universal/`, under a .partial name until it is whole."""
    target = path / UNIVERSAL
    if dist_env.is_main and not (target / COMPLETE).is_file():
        partial = path / (UNIVERSAL + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
             "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"converting {path} to DeepSpeed's universal checkpoint (to resume on another "
                                  f"number of ranks) failed:\n{(done.stdout + done.stderr)[-3000:]}")
        shutil.copyfile(path / COMPLETE, partial / COMPLETE)
        os.rename(partial, target)
    _barrier()
    return target


def data_read_before(path: Path) -> tuple[int, int]:
    """(epoch, samples read in it over every rank and loader worker) of the run that wrote `path`."""
    positions = [torch.load(f, weights_only=False)["data"]["position"] for f in sorted(path.glob("rank_*.pt"))]
    if not positions:
        return 0, 0
    epoch = max(p["epoch"] for p in positions)
    return epoch, sum(sum(p["cursors"].values()) for p in positions if p["epoch"] == epoch)


def load_checkpoint(engine: TrainingEngine, path: Path, dist_env: DistEnv,
                    universal: Path | None = None) -> tuple[int, dict[str, Any] | None]:
    """Restore model, optimizer and schedule (from `universal`, DeepSpeed's universal form of `path`,
    when the number of ranks changed); return (step, this rank's RNG/data state, or None when the
    checkpoint has none for this rank)."""
    source = universal or path
    loaded, client = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint at {source}")
    if universal is not None:
        # A universal checkpoint holds parameters and optimizer state, not buffers (BatchNorm statistics).
        state = consolidated_state_dict(path)
        for name, buffer in engine.module.named_buffers():
            if name in state:
                buffer.copy_(state[name])
    rank_file = path / f"rank_{dist_env.rank:05d}.pt"
    if written_by(path) != dist_env.world_size or not rank_file.is_file():
        return int(client["step"]), None
    return int(client["step"]), torch.load(rank_file, weights_only=False)
