"""LLaVA's two stages the README way (2-rank ZeRO-3): the pretraining stage trains the projector alone and
its loss falls; the finetuning stage starts from that run, trains the projector and the LM on questions
posed as a chat, its loss falls, and it answers every question of each image (VQA accuracy reported)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import SMALL_DEMO, check, deepspeed_cmd, demo_annotations, launch, read_metrics, series
from vlforge.hub.export import export_run
from vlforge.tasks.metrics.vqa import normalize_answer

# The recipes' tower comes from runs/clip_demo in the full demo; here the tower is random and frozen.
COMMON = [*SMALL_DEMO, "data.num_workers=1", "trainer.log_every=10", "optim.warmup_steps=5"]


@pytest.mark.slow
def test_llava_pretrain_then_finetune_on_two_ranks(e2e_env: dict[str, str], tmp_path: Path) -> None:
    pretrain = tmp_path / "pretrain"
    check(launch(deepspeed_cmd(2, "recipe=llava_pretrain_demo", *COMMON, "trainer.init_from=null",
                               f"run_dir={pretrain}", "trainer.max_steps=30", "trainer.eval_at_end=false",
                               "trainer.save_every=30"), e2e_env))
    loss = series(read_metrics(pretrain), "train/loss")
    # The projector alone steers a frozen random LM: the loss falls, slowly.
    assert loss[30] < 0.97 * loss[10], loss

    finetune = tmp_path / "finetune"
    result = check(launch(deepspeed_cmd(2, "recipe=llava_finetune_demo", *COMMON, f"trainer.init_from={pretrain}",
                                        f"run_dir={finetune}", "trainer.max_steps=30", "trainer.eval_every=15",
                                        "trainer.save_every=30"), e2e_env))
    assert f"weights from {pretrain}" in result.output
    rows = read_metrics(finetune)
    loss = series(rows, "train/loss")
    assert loss[30] < 0.7 * loss[10], loss
    val_loss = series(rows, "val/loss")
    assert val_loss[30] < val_loss[15], val_loss
    final = next(row for row in reversed(rows) if "test/answer_accuracy" in row)
    results = json.loads((finetune / "results" / "test_step_00000030.json").read_text())
    assert {"sample_id", "image_id", "question", "answer"} == set(results[0])
    # Every question of every test image is answered: a demo scene asks 3 (one shape) or 5 questions.
    asked: dict[str, list[str]] = {}
    for row in results:
        asked.setdefault(row["image_id"], []).append(row["sample_id"])
    assert len(asked) == 64 and final["test/num_samples"] == len(results)
    for image_id, sample_ids in asked.items():
        assert sorted(sample_ids) == [f"{image_id}_q{k}" for k in range(len(sample_ids))] and len(sample_ids) in (3, 5)
    # Each answer is scored against its own question's reference answers in the test shards.
    annotations = demo_annotations(finetune, "test")
    references = {}
    for row in results:
        qa = annotations[row["image_id"]]["qa"][int(row["sample_id"].rsplit("_q", 1)[1])]
        assert row["question"] == qa["question"], row
        references[row["sample_id"]] = qa["answers"]
    predictions = {row["sample_id"]: row["answer"] for row in results}
    expected = sum(normalize_answer(predictions[q]) == refs[0] for q, refs in references.items()) / len(references)
    assert final["test/answer_accuracy"] == pytest.approx(expected, abs=1e-9)

    # The finetuned run exports whole (python -m vlforge.hub.export does this): projector and LM, all finite.
    exported = tmp_path / "export"
    export_run(finetune, exported)
    weights = load_file(str(exported / "model.safetensors"))
    assert any(k.startswith("projector.") for k in weights) and any(k.startswith("language_model.") for k in weights)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
