"""Stop signals: any rank's signal is every rank's, so all save the same step; SLURM requeue errors are named."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlforge.trainer.preemption import StopRequest, requeue_slurm_job


def test_a_signal_is_noted_and_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    request = StopRequest(torch.device("cpu"))
    assert request.agreed() is None
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one acted on
    assert request.agreed() == signal.SIGUSR1
    request.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def _agree(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    request = StopRequest(torch.device("cpu"))
    first = request.agreed()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
    second = request.agreed()
    Path(out, f"rank{rank}").write_text(f"{first} {second and second.name}")
    dist.destroy_process_group()


def test_one_signalled_rank_stops_every_rank(tmp_path: Path) -> None:
    from tests.e2e.conftest import free_port

    mp.start_processes(_agree, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "None SIGUSR1"


def test_requeue_outside_slurm_and_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert requeue_slurm_job({}) is None
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="scontrol requeue 77 failed: Requested operation is presently disabled"):
        requeue_slurm_job({"SLURM_JOB_ID": "77"})


def test_submitits_signal_also_stops_and_sigterm_wins() -> None:
    from vlforge.trainer.preemption import REQUEUE_SIGNALS

    request = StopRequest(torch.device("cpu"))
    try:
        os.kill(os.getpid(), signal.SIGUSR2)  # submitit's time-limit signal
        assert request.agreed() == signal.SIGUSR2 and signal.SIGUSR2 in REQUEUE_SIGNALS
        assert signal.SIGTERM not in REQUEUE_SIGNALS  # preemption and scancel: save, no requeue
    finally:
        request.restore()
