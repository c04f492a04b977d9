"""Stopping cleanly when the scheduler asks: finish the step, save a checkpoint, requeue.

SLURM sends SIGUSR1 ahead of the time limit when the job asks for it (`#SBATCH --signal=USR1@120`,
or `scancel --signal=USR1 <job>` by hand; submitit asks for SIGUSR2), and SIGTERM when it preempts or
cancels the job. Each
rank notes the signal; after every step the ranks agree (an all-reduce of what they received, since
a signal reaches ranks at slightly different moments) and, if any rank was signalled, all of them
save the same step. On SIGUSR1 or SIGUSR2 under SLURM rank 0 then requeues the job (`scontrol requeue`), and the
requeued job resumes from that checkpoint with `trainer.resume=auto`. On SIGTERM the run only saves:
a preempting SLURM requeues the job itself when its PreemptMode says so, and a cancelled job should
stay cancelled.
"""
from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType
from typing import Any, Mapping

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Installs handlers for SIGUSR1, SIGUSR2 and SIGTERM (main thread only) until `restore`.

    Install it before data-loader workers start: forked workers inherit the handler, where the
    default action of either signal (which SLURM delivers to every process of the step) would kill
    them and fail the batch being loaded.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.received: int = 0
        self._previous: dict[int, Any] = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def agreed(self) -> signal.Signals | None:
        """The signal any rank received (the highest number: SIGTERM over SIGUSR2 over SIGUSR1), the
        same on every rank; None if none."""
        value = self.received
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([value], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            value = int(flag.item())
        return signal.Signals(value) if value else None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This SLURM job's id (an array task has its own), or None outside SLURM."""
    return (os.environ if env is None else env).get("SLURM_JOB_ID") or None


def requeue_slurm_job(env: Mapping[str, str] | None = None) -> str | None:
    """Requeue this SLURM job (`scontrol requeue`); returns its id, or None outside SLURM.
    Raises RuntimeError naming the job and scontrol's message when SLURM refuses."""
    job = slurm_job_id(env)
    if not job:
        return None
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job} failed: {(done.stderr or done.stdout).strip()}")
    return job
