"""Faults during checkpoint saves, injected for real: a run SIGKILLed at each point of a save, five
times in a row, resumes with trainer.resume=auto each time and ends with the parameters of a run never
interrupted; a full disk (a real small tmpfs where this process may mount one) stops the run with the
path and the space named, the previous checkpoint intact."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.e2e.conftest import SMALL_DEMO, check, launch, python_cmd
from vlforge.core.checkpoints import complete_checkpoints, consolidated_state_dict
from vlforge.trainer.faults import FAIL_AT_SAVE_ENV, SAVE_POINTS

MAX_STEPS = 12


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "recipe=clip_demo", *SMALL_DEMO, f"run_dir={run_dir}", "deepspeed=zero3", "data.batch_size=16",
        "data.num_workers=1", "data.train.shuffle_buffer=40", f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=2", "trainer.keep_last=2", "trainer.log_every=1", "trainer.eval_every=0",
        "trainer.eval_at_end=false", "trainer.resume=auto", *extra,
    ]


# Each launch is killed at one point of one save, then the next launch resumes from what is left:
# (the save it is killed in, where, the step the next launch resumes from).
KILLS = [
    (4, "rank_file", 2),         # step 4 half-written: back to 2
    (6, "before_complete", 4),   # every file of step 6 but its marker: back to 4
    (8, "before_rename", 6),     # step 8 complete, still named .partial: back to 6
    (10, "prune", 10),           # step 10 in place, step 6 half-removed: from 10
    (12, "before_latest", 12),   # step 12 in place, `latest` still naming 10: from 12
]


@pytest.fixture(scope="module")
def straight_run(e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    check(launch(python_cmd(*_args(run_dir)), e2e_env))
    return run_dir


@pytest.mark.slow
def test_a_run_killed_at_every_point_of_a_save_resumes_to_the_same_parameters(
    e2e_env: dict[str, str], straight_run: Path, tmp_path: Path
) -> None:
    assert sorted(point for _, point, _ in KILLS) == sorted(SAVE_POINTS)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    resumed_from = None
    for step, point, next_start in KILLS:
        killed = launch(python_cmd(*_args(run_dir)), {**e2e_env, FAIL_AT_SAVE_ENV: f"{step}:{point}"})
        assert killed.returncode == -signal.SIGKILL, (point, killed.output[-3000:])
        if resumed_from is not None:
            assert f"at step {resumed_from}" in killed.output, point
        assert [s for s, _ in complete_checkpoints(ckpts)][-1] == next_start, (point, sorted(os.listdir(ckpts)))
        resumed_from = next_start
    left = sorted(p.name for p in ckpts.glob("step_*"))
    assert left == ["step_00000006.deleting", "step_00000008", "step_00000010", "step_00000012"], left
    assert (ckpts / "latest").read_text() == "step_00000010"

    final = check(launch(python_cmd(*_args(run_dir)), e2e_env))
    assert f"resuming from {ckpts / 'step_00000012'} at step 12" in final.output
    want = consolidated_state_dict(straight_run / "checkpoints" / "step_00000012")
    got = consolidated_state_dict(ckpts / "step_00000012")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=f"{name} differs")


@pytest.fixture
def small_filesystem(tmp_path: Path, straight_run: Path) -> Iterator[Path | None]:
    """A tmpfs with room for one checkpoint of the run and its logs but not two; None where this
    process may not mount one (the disk-full fault is then injected)."""
    one = sum(f.stat().st_size for f in (straight_run / "checkpoints" / "step_00000012").rglob("*") if f.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    size = int(one * 1.6) + 4 * 2**20
    mounted = shutil.which("mount") and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode == 0
    yield mount if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_the_path_and_the_space_and_keeps_the_last_checkpoint(
    e2e_env: dict[str, str], small_filesystem: Path | None, tmp_path: Path
) -> None:
    env = dict(e2e_env)
    if small_filesystem is None:
        env[FAIL_AT_SAVE_ENV] = "4:enospc"
    run_dir = (small_filesystem or tmp_path) / "run"
    failed = launch(python_cmd(*_args(run_dir, "trainer.max_steps=4")), env)
    assert failed.returncode == 1, failed.output[-3000:]
    print("\n".join(line for line in failed.output.splitlines() if "disk is full" in line))
    ckpts = (run_dir / "checkpoints").resolve()
    assert "checkpoint of step 4: the disk is full" in failed.output, failed.output[-3000:]
    assert f"are free under {ckpts} with the partial save removed" in failed.output
    assert "needs about" in failed.output and "MiB" in failed.output
    assert f"the previous checkpoint {ckpts / 'step_00000002'} is intact" in failed.output
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2]
    assert not (ckpts / "step_00000004.partial").exists()
    # What is left resumes: with room again, the same command finishes from step 2.
    if small_filesystem is not None:
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_filesystem)], check=True)
    env.pop(FAIL_AT_SAVE_ENV, None)
    resumed = check(launch(python_cmd(*_args(run_dir, "trainer.max_steps=4")), env))
    assert "at step 2" in resumed.output
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 4]
