"""A rank killed mid-run, for real: `vlforge train --nproc 2`, then SIGKILL to rank 1 while both train.
The other rank does not hang: the whole job ends within a bounded time, naming the dead rank, with no
process and no DeepSpeed shared-memory file left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, REPO, SMALL_DEMO, free_port
from vlforge.core.distributed import shared_memory_buffer

SECONDS_TO_EXIT = 60


def _processes_with(marker: str) -> dict[int, str]:
    """pid -> command line of every process whose command line holds `marker`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found[int(entry.name)] = cmdline
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line), default=0)


@pytest.mark.slow
def test_a_rank_killed_mid_run_ends_the_job_naming_it_and_leaves_nothing(e2e_env: dict[str, str], tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    buffers = [shared_memory_buffer(rank, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    cmd = [str(BIN / "vlforge"), "train", "--nproc", "2", "--master-port", str(port), "recipe=clip_demo", *SMALL_DEMO,
           f"run_dir={run_dir}", "data.batch_size=8", "trainer.max_steps=1000", "trainer.log_every=1",
           "trainer.eval_every=0", "trainer.save_every=0"]
    log = tmp_path / "output.txt"
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=REPO, env=e2e_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while _steps_logged(run_dir) < 3:
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        # Both ranks train, and DeepSpeed's buffers are already gone from /dev/shm (still mapped).
        assert not any(path.exists() for path in buffers)
        rank1_and_workers = [pid for pid, line in _processes_with(f"run_dir={run_dir}").items()
                             if "--local_rank=1" in line]
        # The rank itself, not one of its data loader workers (forked: the same command line).
        (rank1,) = [pid for pid in rank1_and_workers if _parent(pid) not in rank1_and_workers]
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        code = job.wait(timeout=SECONDS_TO_EXIT)
        seconds = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text()
    print(f"\ndead rank: the job exited {seconds:.1f} s after rank 1 was killed, status {code}")
    assert code != 0
    assert "'--local_rank=1'" in output and "exits with return code = -9" in output, output[-3000:]
    assert _processes_with(f"run_dir={run_dir}") == {}  # rank 0 did not outlive it
    assert not any(path.exists() for path in buffers)
