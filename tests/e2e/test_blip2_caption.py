"""BLIP-2 captioning on the demo data, 2-rank ZeRO-3: the LM loss falls and beam-search captions are
scored (ranks decode in step, transformers' synced_gpus); then launch/evaluate.py with checkpoint=null
scores the run's weights, named as trainer.init_from, on one rank and finds the same metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import SMALL_DEMO, check, deepspeed_cmd, demo_annotations, launch, python_cmd, read_metrics
from vlforge.tasks.metrics.captioning import caption_metrics

BLIP2 = ["recipe=blip2_caption_demo", *SMALL_DEMO, "data.num_workers=1", "data.batch_size=16",
         "task.generate.num_beams=2", "task.generate.max_length=12", "data.demo.num_val=24"]


@pytest.mark.slow
def test_blip2_caption_demo_trains_scores_and_reevaluates_from_init_weights(e2e_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    result = check(launch(deepspeed_cmd(2, *BLIP2, f"run_dir={run_dir}", "trainer.max_steps=30", "trainer.log_every=10",
                                        "trainer.eval_every=0", "trainer.save_every=30", "optim.warmup_steps=5"), e2e_env))
    assert "2 rank(s) via deepspeed" in result.output and "ZeRO-3" in result.output
    rows = read_metrics(run_dir)
    losses = [row["train/loss_lm"] for row in rows if "train/loss_lm" in row]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    final = next(row for row in reversed(rows) if "val/cider" in row)
    assert final["val/num_images"] == 24 and 0.0 <= final["val/cider"]
    captions = json.loads((run_dir / "results" / "val_step_00000030.json").read_text())
    assert len(captions) == 24 and all(isinstance(c["caption"], str) for c in captions)
    # The reported CIDEr scores the saved captions against their own images' references in the val shards.
    annotations = demo_annotations(run_dir, "val")
    rescored = caption_metrics({c["image_id"]: c["caption"] for c in captions},
                               {c["image_id"]: annotations[c["image_id"]]["captions"] for c in captions})
    assert final["val/cider"] == pytest.approx(rescored["cider"], abs=1e-9)

    out = tmp_path / "from_init"
    result = check(launch(python_cmd(*BLIP2, "checkpoint=null", f"trainer.init_from={run_dir}", f"run_dir={out}",
                                     "splits=[val]", script="launch/evaluate.py"), e2e_env))
    assert "on 1 rank(s)" in result.output
    trained = {k: v for k, v in final.items() if k.startswith("val/")}
    assert json.loads((out / "eval.json").read_text())["metrics"] == pytest.approx(trained, abs=1e-6)


def test_evaluate_without_checkpoint_needs_init_weights(e2e_env: dict[str, str], tmp_path: Path) -> None:
    result = launch(python_cmd("recipe=blip_caption_demo", "checkpoint=null", f"run_dir={tmp_path}/out",
                               script="launch/evaluate.py"), e2e_env, timeout=120)
    assert result.returncode != 0
    assert "checkpoint=null evaluates the recipe's trainer.init_from weights" in result.output
