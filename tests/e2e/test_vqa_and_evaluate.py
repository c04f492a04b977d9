"""VQA trained the README way (2-rank ZeRO-3, every question of an image in one step), scored by
VQAv2 accuracy per answer type, then evaluated by launch/evaluate.py on one rank in both modes: the
generated answers score as training's own two-rank evaluation did, and rank mode picks from a candidate list."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import SMALL_DEMO, check, deepspeed_cmd, launch, python_cmd, read_metrics, series

# From scratch here: the recipe's tower from runs/clip_demo is for the full demo, not this test.
VQA = ["recipe=blip_vqa_demo", *SMALL_DEMO, "data.num_workers=1", "trainer.init_from=null",
       "optim.lr_multipliers.vision=1.0"]


@pytest.mark.slow
def test_vqa_demo_trains_scores_and_evaluates_on_any_rank_count(e2e_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    check(launch(deepspeed_cmd(2, *VQA, f"run_dir={run_dir}", "trainer.max_steps=30", "trainer.eval_every=30",
                               "trainer.save_every=30", "trainer.log_every=10", "optim.warmup_steps=5"), e2e_env))
    rows = read_metrics(run_dir)
    final = next(row for row in reversed(rows) if "test/accuracy" in row)
    types = {k.removeprefix("val/accuracy_") for k in final if k.startswith("val/accuracy_")}
    assert types == {"color", "shape", "number", "position"}
    # The demo's images carry 3 to 5 questions each; every one is answered, on two ranks.
    assert 3 * 64 <= final["val/num_questions"] <= 5 * 64
    loss = series(rows, "train/loss")
    assert loss[30] < 0.7 * loss[10], loss
    results = json.loads((run_dir / "results" / "test_step_00000030.json").read_text())
    assert len(results) == final["test/num_questions"] and {"question_id", "answer"} == set(results[0])

    trained = {k: v for k, v in final.items() if k.startswith("val/")}
    out = tmp_path / "one_rank"
    check(launch(python_cmd(*VQA, f"checkpoint={run_dir}", f"run_dir={out}", "splits=[val]",
                            script="launch/evaluate.py"), e2e_env))
    assert json.loads((out / "eval.json").read_text())["metrics"] == pytest.approx(trained, abs=1e-6)

    # Rank mode: the likeliest of a candidate list, here every answer the demo gives.
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "green", "blue", "yellow", "purple", "orange", "circle", "square",
                                   "triangle", "diamond", "star", "cross", "1", "2", "3", "yes", "no"]))
    ranked = tmp_path / "ranked"
    check(launch(python_cmd(*VQA, f"checkpoint={run_dir}", f"run_dir={ranked}", "splits=[val]", "task.mode=rank",
                            f"task.answer_list={answers}", "task.rank_k=8", script="launch/evaluate.py"), e2e_env))
    metrics = json.loads((ranked / "eval.json").read_text())["metrics"]
    assert metrics["val/num_questions"] == final["val/num_questions"]
    picked = json.loads(next((ranked / "results").glob("val_*.json")).read_text())
    assert len(picked) == final["val/num_questions"]
    assert {row["answer"] for row in picked} <= set(json.loads(answers.read_text()))
