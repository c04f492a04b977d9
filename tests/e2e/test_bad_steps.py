"""Steps with a non-finite loss, injected for real (VLFORGE_NAN_AT_STEPS makes a step's loss, and so
its gradients, NaN): each is skipped on every rank, leaving the parameters as they were, and counted;
too many in a row stop the run with the last checkpoint intact."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import SMALL_DEMO, check, deepspeed_cmd, launch, python_cmd, read_metrics, series
from vlforge.core.checkpoints import consolidated_state_dict
from vlforge.trainer.faults import NAN_AT_STEPS_ENV


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["recipe=clip_demo", *SMALL_DEMO, f"run_dir={run_dir}", "data.batch_size=8", "data.num_workers=1",
            "trainer.max_steps=6", "trainer.save_every=1", "trainer.keep_last=10", "trainer.log_every=1",
            "trainer.eval_at_end=false", *extra]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{step:08d}")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("ranks, stage, nan_on", [(1, "zero0", ""), (2, "zero3", ":1")],
                         ids=["one rank, plain fp32 optimizer", "two ranks ZeRO-3, NaN on rank 1 only"])
def test_a_non_finite_step_is_skipped_on_every_rank_and_counted(e2e_env: dict[str, str], tmp_path: Path,
                                                               ranks: int, stage: str, nan_on: str) -> None:
    args = _args(tmp_path, f"deepspeed={stage}")
    cmd = python_cmd(*args) if ranks == 1 else deepspeed_cmd(ranks, *args)
    result = check(launch(cmd, {**e2e_env, NAN_AT_STEPS_ENV: f"3,4{nan_on}"}))
    bad_rank = nan_on.lstrip(":") or "0"
    assert f"step 3 skipped: a non-finite loss on rank(s) {bad_rank} (parameters not updated; 1 bad step(s) so far)" \
        in result.output, result.output[-3000:]
    assert "step 4 skipped" in result.output and "step 5 skipped" not in result.output

    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: a skipped step logs no inf or NaN
    rows = read_metrics(tmp_path)
    assert series(rows, "train/bad_steps") == {1: 0.0, 2: 0.0, 3: 1.0, 4: 2.0, 5: 2.0, 6: 2.0}
    losses = series(rows, "train/loss")
    assert all(torch.isfinite(torch.tensor(losses[s])) for s in (1, 2, 5, 6)), losses
    weights = {step: _weights(tmp_path, step) for step in range(2, 7)}
    assert _same(weights[2], weights[3]) and _same(weights[3], weights[4])  # the two bad steps changed nothing
    assert not _same(weights[4], weights[5])  # and training went on after them
    assert all(torch.isfinite(v).all() for v in weights[6].values() if v.is_floating_point())


@pytest.mark.slow
def test_too_many_bad_steps_in_a_row_stop_the_run_with_the_last_checkpoint_intact(e2e_env: dict[str, str],
                                                                                   tmp_path: Path) -> None:
    args = _args(tmp_path, "deepspeed=zero3", "trainer.save_every=2", "trainer.max_bad_steps=3")
    result = launch(python_cmd(*args), {**e2e_env, NAN_AT_STEPS_ENV: "3,4,5"})
    assert result.returncode == 1, result.output[-3000:]
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    assert (f"3 steps in a row (3 to 5) had a non-finite loss on rank(s) 0 (trainer.max_bad_steps=3); none of "
            f"them updated the parameters and the last checkpoint, {ckpt}, is intact") in result.output, \
        result.output[-3000:]
    assert _same(_weights(tmp_path, 2), _weights(tmp_path, 4))
    assert not (tmp_path / "checkpoints" / "step_00000006").exists()
