"""Resume: 20 steps straight == 10 steps, the process SIGKILLed, then resume=auto to step 20."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import SMALL_DEMO, check, launch, python_cmd, read_metrics, series


def _args(run_dir: Path) -> list[str]:
    # ZeRO-3 with a loader worker, a shuffle buffer and random crops: every piece of state matters.
    return [
        "recipe=clip_demo", *SMALL_DEMO, f"run_dir={run_dir}", "deepspeed=zero3", "data.batch_size=16",
        "data.num_workers=2", "data.train.shuffle_buffer=40", "trainer.max_steps=20", "trainer.save_every=10",
        "trainer.log_every=1", "trainer.eval_at_end=false", "trainer.record_sample_keys=true", "trainer.resume=auto",
    ]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000020")


def _keys_by_step(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    seen: dict[tuple[int, int], list[str]] = {}
    for line in (run_dir / "samples_rank0.jsonl").read_text().splitlines():
        row = json.loads(line)
        seen[(row["step"], row["micro"])] = row["keys"]  # a resumed run's record replaces the lost one
    return seen


@pytest.mark.slow
def test_killed_run_resumes_exactly(e2e_env: dict[str, str], tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    check(launch(python_cmd(*_args(straight)), e2e_env))

    killed = launch(python_cmd(*_args(broken)), {**e2e_env, "VLFORGE_FAIL_AT_STEP": "13"})
    assert killed.returncode == -signal.SIGKILL, killed.output[-3000:]
    assert (broken / "checkpoints" / "step_00000010" / "complete.json").is_file()
    assert not (broken / "checkpoints" / "step_00000020").exists()

    resumed = check(launch(python_cmd(*_args(broken)), e2e_env))
    assert "resuming from" in resumed.output and "at step 10" in resumed.output

    assert _keys_by_step(broken) == _keys_by_step(straight)
    assert len(_keys_by_step(straight)) == 20
    ref, got = series(read_metrics(straight), "train/loss"), series(read_metrics(broken), "train/loss")
    for step in range(11, 21):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step
    a, b = _weights(straight), _weights(broken)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=f"{name} differs after resume")
