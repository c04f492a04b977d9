"""ALBEF resume under 2-rank ZeRO-3: 8 steps straight == 5 steps, SIGKILL, resume=auto from step 4 to 8.

ALBEF carries state beyond the optimizer's: a momentum encoder of frozen parameters (not in the ZeRO
optimizer, saved by DeepSpeed as per-rank "frozen" fragments), feature queues and their pointer
(buffers), and host-side caches of the pointer and the ready flag. The queue (48) is not a multiple of
the global batch times the checkpoint step (16 x 4), so the pointer is mid-queue (16) at the resume.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import SMALL_DEMO, check, deepspeed_cmd, launch, read_metrics, series

STEPS, SAVE_EVERY, FAIL_AT = 8, 4, 6
BATCH, WORLD, QUEUE = 8, 2, 48
PARTS = ("loss", "loss_itc", "loss_itm", "loss_mlm")


def _args(run_dir: Path) -> list[str]:
    return [
        "recipe=albef_pretrain", *SMALL_DEMO, f"run_dir={run_dir}", f"data.batch_size={BATCH}", "data.num_workers=1",
        f"model.queue_size={QUEUE}", f"trainer.max_steps={STEPS}", f"trainer.save_every={SAVE_EVERY}",
        "trainer.log_every=1", "trainer.eval_at_end=false", "trainer.resume=auto",
    ]


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Trainable and frozen (momentum) parameters gathered from the partitions, plus the buffers."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{STEPS:08d}")


def _rank_buffers(run_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{STEPS:08d}" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: module[k] for k in ("image_queue", "text_queue", "queue_ptr", "momentum_ready")}


@pytest.mark.slow
def test_albef_killed_run_resumes_exactly_under_zero3(e2e_env: dict[str, str], tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    check(launch(deepspeed_cmd(WORLD, *_args(straight)), e2e_env))

    killed = launch(deepspeed_cmd(WORLD, *_args(broken)), {**e2e_env, "VLFORGE_FAIL_AT_STEP": str(FAIL_AT)})
    # The launcher reports the SIGKILLed rank and exits non-zero.
    assert killed.returncode != 0 and f"return code = -{int(signal.SIGKILL)}" in killed.output, killed.output[-3000:]
    assert (broken / "checkpoints" / f"step_{SAVE_EVERY:08d}" / "complete.json").is_file()
    assert not (broken / "checkpoints" / f"step_{STEPS:08d}").exists()

    resumed = check(launch(deepspeed_cmd(WORLD, *_args(broken)), e2e_env))
    assert "ZeRO-3" in resumed.output and f"{WORLD} rank(s)" in resumed.output
    assert "resuming from" in resumed.output and f"at step {SAVE_EVERY}" in resumed.output

    # Every loss part of every step after the resume, as logged (mean over ranks).
    ref_rows, got_rows = read_metrics(straight), read_metrics(broken)
    for part in PARTS:
        ref, got = series(ref_rows, f"train/{part}"), series(got_rows, f"train/{part}")
        assert sorted(ref) == list(range(1, STEPS + 1)), part
        for step in range(SAVE_EVERY + 1, STEPS + 1):
            assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (part, step, got[step], ref[step])

    # The final checkpoint: model, momentum encoder (frozen under ZeRO-3), queues, pointer, ready flag.
    a, b = _final_state(straight), _final_state(broken)
    assert a.keys() == b.keys()
    momentum = [k for k in a if k.startswith("momentum_model.")]
    assert momentum and {"image_queue", "text_queue", "queue_ptr", "momentum_ready"} <= a.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=f"{name} differs after resume")
    assert int(a["queue_ptr"]) == (STEPS * BATCH * WORLD) % QUEUE and bool(a["momentum_ready"])
    # The comparison means something only if the momentum encoder is an average, not a copy, of the model.
    assert any(not torch.allclose(a[k].float(), a["model." + k[len("momentum_model."):]].float(), atol=1e-6) for k in momentum)

    # Each rank keeps (and saves) its own copy of the queues: identical across ranks and runs.
    for rank in range(WORLD):
        ref_buf, got_buf = _rank_buffers(straight, rank), _rank_buffers(broken, rank)
        for name in ref_buf:
            torch.testing.assert_close(got_buf[name], ref_buf[name], rtol=0, atol=0, msg=f"rank {rank} {name}")
            torch.testing.assert_close(got_buf[name], a[name], rtol=0, atol=0, msg=f"rank {rank} {name} vs rank 0")
