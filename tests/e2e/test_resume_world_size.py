"""Resume on another number of ranks, ZeRO-3 with optimizer state: 2 ranks train past step 4 and are
killed, 1 rank goes on from step 4 past step 7 and is killed, 2 ranks again from step 7 to step 10, each resume through DeepSpeed's universal checkpoint. The
schedule goes on where it was (the learning rate of every step equals an uninterrupted run's), the
weights come back (the first step after a resume moves them as little as a step of the uninterrupted
run), and the epoch's position in samples is kept."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import SMALL_DEMO, check, deepspeed_cmd, launch, python_cmd, read_metrics, series
from vlforge.core.checkpoints import consolidated_state_dict

GLOBAL_BATCH = 16


def _args(run_dir: Path, ranks: int) -> list[str]:
    return ["recipe=clip_demo", *SMALL_DEMO, f"run_dir={run_dir}", "deepspeed=zero3",
            f"data.batch_size={GLOBAL_BATCH // ranks}", "data.num_workers=1", "trainer.max_steps=10",
            "trainer.save_every=1", "trainer.keep_last=20", "trainer.log_every=1", "trainer.eval_at_end=false", "trainer.resume=auto",
            "optim.warmup_steps=2"]


def _launch(run_dir: Path, ranks: int, env: dict[str, str], killed_at: int | None = None) -> str:
    """Train on `ranks` ranks; `killed_at`: SIGKILLed before that step (the schedule is the one of a
    10-step run whichever launch runs it)."""
    args = _args(run_dir, ranks)
    cmd = python_cmd(*args) if ranks == 1 else deepspeed_cmd(ranks, *args)
    if killed_at is None:
        return check(launch(cmd, env)).output
    result = launch(cmd, {**env, "VLFORGE_FAIL_AT_STEP": str(killed_at)})
    assert result.returncode != 0, result.output[-3000:]
    return result.output


@pytest.mark.slow
def test_a_run_resumes_on_one_rank_then_on_two(e2e_env: dict[str, str], tmp_path: Path) -> None:
    straight, run = tmp_path / "straight", tmp_path / "run"
    _launch(straight, 2, e2e_env)
    _launch(run, 2, e2e_env, killed_at=5)  # saved at step 4
    to_one = _launch(run, 1, e2e_env, killed_at=8)  # saved at step 7
    to_two = _launch(run, 2, e2e_env)

    for output, step, ranks_before, ranks_now, read in ((to_one, 4, 2, 1, 4 * GLOBAL_BATCH),
                                                        (to_two, 7, 1, 2, 7 * GLOBAL_BATCH)):
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        assert f"resuming from {ckpt} at step {step}" in output, output[-3000:]
        assert (f"{ckpt} was written by {ranks_before} rank(s): weights, optimizer and schedule load through "
                f"DeepSpeed's universal checkpoint ({ckpt / 'universal'}); epoch 0 goes on, each of the "
                f"{ranks_now} rank(s) skipping its share of the {read} samples read in it") in output, output[-3000:]
        assert (ckpt / "universal" / "complete.json").is_file()

    got, want = read_metrics(run), read_metrics(straight)
    lr_got, lr_want = series(got, "train/lr"), series(want, "train/lr")
    assert [lr_got[s] for s in range(1, 11)] == pytest.approx([lr_want[s] for s in range(1, 11)], rel=1e-6)
    loss_got = series(got, "train/loss")
    assert all(math.isfinite(loss_got[s]) for s in range(1, 11))
    # Weights, Adam's moments and BatchNorm statistics came back: the first step on the new number of
    # ranks moves the parameters as far as the uninterrupted run's step does (Adam starting afresh would
    # move every one by the whole learning rate, three times as far here), and the statistics no
    # further than its step moves them.
    for step in (4, 7):
        before, after = (consolidated_state_dict(run / "checkpoints" / f"step_{s:08d}") for s in (step, step + 1))
        ref_before, ref_after = (consolidated_state_dict(straight / "checkpoints" / f"step_{s:08d}")
                                 for s in (step, step + 1))
        for kind, bound in (("parameters", 1.35), ("statistics", 3.0)):
            moved, ref_moved = _distance(after, before, kind), _distance(ref_after, ref_before, kind)
            print(f"\nresume at step {step}: the first step moved the {kind} by {moved:.4f}, the uninterrupted "
                  f"run's by {ref_moved:.4f}")
            assert ref_moved / bound < moved < bound * ref_moved, (step, kind, moved, ref_moved)
    assert _distance(consolidated_state_dict(run / "checkpoints" / "step_00000004"),
                     consolidated_state_dict(straight / "checkpoints" / "step_00000004"), "parameters") == 0


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], kind: str) -> float:
    keys = [k for k in a if a[k].is_floating_point() and ("running_" in k) == (kind == "statistics")]
    return math.sqrt(sum(float((a[k] - b[k]).detach().square().sum()) for k in keys))
