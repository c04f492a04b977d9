"""Fault injection for the recovery tests: a process kills itself, for real, at a named point.

`VLFORGE_FAIL_AT_STEP=N`: SIGKILL before training step N. `VLFORGE_FAIL_AT_SAVE=STEP:POINT[:RANK]`:
SIGKILL at POINT of the save of step STEP, on every rank or only on RANK; POINT is one of
`SAVE_POINTS`. `enospc` instead makes that save's writes fail with ENOSPC, as a full disk does.
`VLFORGE_NAN_AT_STEPS=3,4[:RANK]`: the loss of those training steps is NaN (on RANK only), as a
bad batch makes it, and so are the gradients it gives. Nothing happens unless a variable is set.
"""
from __future__ import annotations

import errno
import os
import signal

import torch

FAIL_AT_STEP_ENV = "VLFORGE_FAIL_AT_STEP"
FAIL_AT_SAVE_ENV = "VLFORGE_FAIL_AT_SAVE"
NAN_AT_STEPS_ENV = "VLFORGE_NAN_AT_STEPS"

SAVE_POINTS = (
    "rank_file",        # DeepSpeed's files written, this rank's own file half-written
    "before_complete",  # every rank's files written, the completion marker not yet
    "before_rename",    # complete under step_N.partial, not yet renamed to step_N
    "before_latest",    # renamed, the `latest` pointer not yet moved
    "prune",            # an old checkpoint half-removed
)
ENOSPC_POINT = "enospc"


def kill_before_step(step: int) -> None:
    value = os.environ.get(FAIL_AT_STEP_ENV)
    if value and int(value) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _save_fault(step: int, rank: int) -> str | None:
    value = os.environ.get(FAIL_AT_SAVE_ENV)
    if not value:
        return None
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[1] not in (*SAVE_POINTS, ENOSPC_POINT):
        raise ValueError(f"{FAIL_AT_SAVE_ENV}={value}: expected STEP:POINT[:RANK], POINT one of "
                         f"{', '.join((*SAVE_POINTS, ENOSPC_POINT))}")
    if int(parts[0]) != step or (len(parts) == 3 and int(parts[2]) != rank):
        return None
    return parts[1]


def kill_at_save_point(point: str, step: int, rank: int) -> None:
    if _save_fault(step, rank) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def raise_if_disk_full(step: int, rank: int, path: str) -> None:
    """The injected full disk: OSError(ENOSPC) on `path`, as a write to a full filesystem raises."""
    if _save_fault(step, rank) == ENOSPC_POINT:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def poison_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """`loss`, or NaN times it on a step named by VLFORGE_NAN_AT_STEPS (1-based steps)."""
    value = os.environ.get(NAN_AT_STEPS_ENV)
    if not value:
        return loss
    steps, _, only_rank = value.partition(":")
    if step in {int(s) for s in steps.split(",")} and (not only_rank or int(only_rank) == rank):
        return loss * float("nan")
    return loss
