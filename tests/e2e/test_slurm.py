"""SLURM, for real: a two-node cluster on this machine (tests/e2e/slurm_cluster.py) runs the script
`python -m vlforge.launch.slurm --submit` writes. A 2-node x 1-task ZeRO-3 job trains and checkpoints;
a second, identical job gets SIGUSR1 mid-run (as `--signal=USR1@120` sends it before the time limit),
saves, requeues itself and resumes, twice, and ends with exactly the first job's weights. Then the same recipe
through Hydra's submitit launcher (hydra/launcher=vlforge_slurm)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import REPO, SMALL_DEMO
from tests.e2e.slurm_cluster import LocalSlurm, missing_requirements
from vlforge.core.state_dict import read_weights

BASE = ["recipe=clip_demo", *SMALL_DEMO, "data.num_workers=1", "data.batch_size=16", "trainer.log_every=4",
        "trainer.eval_every=0", "trainer.eval_at_end=false", "optim.warmup_steps=5"]
RUN = [*BASE, "trainer.max_steps=16", "trainer.save_every=4"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    reason = missing_requirements()
    if reason:
        if os.environ.get("VLFORGE_REQUIRE_SLURM"):  # CI installs SLURM: there a skip would hide a failure
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def _submit(slurm: LocalSlurm, env: dict[str, str], logs: Path, name: str, run_dir: Path) -> str:
    cmd = [sys.executable, "-m", "vlforge.launch.slurm", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
           "--cpus-per-task", "1", "--time", "00:20:00", "--job-name", name, "--output-dir", str(logs), "--submit",
           *RUN, f"run_dir={run_dir}"]
    done = subprocess.run(cmd, cwd=REPO, env={**env, **slurm.env}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("Submitted batch job"), done.stdout + done.stderr
    return done.stdout.split()[-1]


def _log(logs: Path, name: str, job: str) -> str:
    path = logs / f"{name}-{job}.out"
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
def test_preempted_job_requeues_and_ends_like_an_uninterrupted_one(slurm: LocalSlurm, e2e_env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    straight = _submit(slurm, e2e_env, logs, "straight", tmp_path / "straight")
    preempted = _submit(slurm, e2e_env, logs, "preempted", tmp_path / "preempted")

    ckpts = tmp_path / "preempted" / "checkpoints"

    def preempt_after_save(step: int, restarts: str) -> None:
        """Wait for the checkpoint of `step`, send SIGUSR1, and start the requeued job at once."""
        deadline = time.monotonic() + 300
        while not (ckpts / f"step_{step:08d}" / "complete.json").exists():
            assert time.monotonic() < deadline, _log(logs, "preempted", preempted)[-3000:]
            assert slurm.job_field(preempted, "JobState") in ("PENDING", "RUNNING"), _log(logs, "preempted", preempted)[-3000:]
            time.sleep(0.2)
        slurm.signal(preempted, "USR1")
        deadline = time.monotonic() + 120
        while slurm.job_field(preempted, "Restarts") != restarts:
            assert time.monotonic() < deadline, _log(logs, "preempted", preempted)[-3000:]
            time.sleep(0.5)
        slurm.start_now(preempted)

    preempt_after_save(4, "1")
    first_stop = int(_log(logs, "preempted", preempted).split("stopped by SIGUSR1 at step ")[1].split()[0])
    second_save = (first_stop // 4 + 1) * 4  # the requeued job's first save of its own
    assert second_save < 16, f"stopped at {first_stop}: no save of the requeued job to preempt after"
    preempt_after_save(second_save, "2")

    for job in (straight, preempted):
        assert slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 400) == "COMPLETED", \
            _log(logs, "straight" if job == straight else "preempted", job)[-4000:]
    log_a, log_b = _log(logs, "straight", straight), _log(logs, "preempted", preempted)
    assert "2 rank(s) via slurm" in log_a and "ZeRO-3" in log_a and "vlforge: done at step 16" in log_a
    stops = [int(part.split()[0]) for part in log_b.split("stopped by SIGUSR1 at step ")[1:]]
    assert len(stops) == 2 and 4 <= stops[0] < stops[1] < 16, log_b[-4000:]
    assert log_b.count(f"requeueing SLURM job {preempted}") == 2, log_b[-4000:]
    assert "(restart 2)" in log_b and f"at step {stops[1]}" in log_b and "vlforge: done at step 16" in log_b
    final = json.loads((tmp_path / "preempted" / "checkpoints" / "step_00000016" / "complete.json").read_text())
    assert final["world_size"] == 2
    a, b = read_weights(tmp_path / "straight"), read_weights(tmp_path / "preempted")
    assert a.keys() == b.keys()
    for key in a:
        if "running_" in key:
            # BatchNorm statistics are averaged over ranks at every save, and the stops added saves.
            # The average of the ranks' moving averages is the moving average of their average, so
            # they agree up to float rounding (seen: 2e-7).
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key  # the weights: bit for bit


@pytest.mark.slow
def test_submitit_launcher_runs_a_two_node_job(slurm: LocalSlurm, e2e_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "submitit"
    cmd = [sys.executable, "launch/train.py", "-m", "hydra/launcher=vlforge_slurm", "hydra.launcher.nodes=2",
           "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=20", *BASE, "trainer.max_steps=6", f"run_dir={run_dir}"]
    done = subprocess.run(cmd, cwd=REPO, env={**e2e_env, **slurm.env}, capture_output=True, text=True, timeout=600)
    logs = "".join(path.read_text() for path in sorted(run_dir.glob("submitit/*/*_log.*")))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + logs[-3000:]
    # The submitting process ran as one rank; each task re-read its place from SLURM.
    assert "2 rank(s) via slurm" in logs and "ZeRO-3" in logs, logs[-3000:]
    assert json.loads((run_dir / "checkpoints" / "step_00000006" / "complete.json").read_text())["world_size"] == 2
