"""Captioning trained and evaluated the README way (2-rank ZeRO-3), then the same checkpoint evaluated
by launch/evaluate.py on one rank: the metrics agree with training's own two-rank evaluation."""
from __future__ import annotations

import html
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.e2e.conftest import SMALL_DEMO, check, deepspeed_cmd, launch, python_cmd, read_metrics, series
from vlforge import load_model, load_model_and_preprocess
from vlforge.datasets.samples import decode_image, decode_meta
from vlforge.datasets.shards import iter_shard
from vlforge.hub.export import main as export_main

CAPTION = ["recipe=blip_caption_demo", *SMALL_DEMO, "data.num_workers=1", "data.batch_size=32"]


@pytest.mark.slow
def test_caption_demo_trains_scores_and_evaluates_on_any_rank_count(e2e_env: dict[str, str], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "train"
    check(launch(deepspeed_cmd(2, *CAPTION, f"run_dir={run_dir}", "trainer.max_steps=60", "trainer.eval_every=30",
                               "trainer.save_every=60", "trainer.log_every=30", "optim.warmup_steps=10",
                               "task.generate.num_beams=2"), e2e_env))
    rows = read_metrics(run_dir)
    cider = series(rows, "val/cider")
    assert sorted(cider) == [30, 60], cider
    assert cider[60] > cider[30], cider
    logged = {k for row in rows for k in row}
    assert {"val/bleu_4", "val/rouge_l", "test/cider"} <= logged
    assert ("val/meteor" in logged) == (shutil.which("java") is not None)  # METEOR runs on Java
    peaks = series(rows, "system/peak_memory_mib")  # the largest rank's peak resident set, MiB
    assert sorted(peaks) == [30, 60] and 200 < peaks[30] <= peaks[60] < 20000, peaks
    results = json.loads((run_dir / "results" / "test_step_00000060.json").read_text())
    assert len(results) == 64 and {"image_id", "caption"} == set(results[0])
    page = (run_dir / "reports" / "test_predictions_step_00000060.html").read_text()
    assert page.count("<img") == 16 and html.escape(results[0]["caption"]) in page
    assert (run_dir / "reports" / "test_predictions_step_00000060.png").is_file()

    final = next(row for row in reversed(rows) if "test/cider" in row)
    # Training evaluated on two ranks; launch/evaluate.py on one rank must find the same metrics.
    trained = {k: v for k, v in final.items() if k.startswith("val/")}
    out = tmp_path / "one_rank"
    result = check(launch(python_cmd(*CAPTION, f"checkpoint={run_dir}", f"run_dir={out}", "splits=[val]",
                                     "task.generate.num_beams=2", script="launch/evaluate.py"), e2e_env))
    assert "(step 60) on 1 rank(s)" in result.output
    assert json.loads((out / "eval.json").read_text())["metrics"] == pytest.approx(trained, abs=1e-6)

    # Exported, then loaded through the inference API: the captions training's evaluation wrote.
    exported = tmp_path / "export"
    result = check(launch([sys.executable, "-m", "vlforge.hub.export", str(run_dir), str(exported)], e2e_env))
    assert "exported step 60" in result.output
    assert {p.name for p in exported.iterdir()} == {"model.safetensors", "config.yaml", "tokenizer", "export.json"}
    model, vis, _ = load_model_and_preprocess("blip_caption", "demo", checkpoint=exported)
    captions = captions_of_split(model, vis["eval"], Path(e2e_env["VLFORGE_DATA_DIR"]) / "demo", "test")
    assert captions == {r["image_id"]: r["caption"] for r in results}
    # The text is the decoded ids: the exported tokenizer, read by transformers, decodes what the model generated.
    raws = [raw for raw in iter_shard(str(sorted((Path(e2e_env["VLFORGE_DATA_DIR"]) / "demo").glob("test-*.tar"))[0]), [])][:8]
    tokenizer = AutoTokenizer.from_pretrained(str(exported / "tokenizer"))
    prompt = tokenizer([model.prompt] * len(raws), return_tensors="pt").input_ids[:, :-1]
    prompt[:, 0] = model.bos_token_id
    ids = model.generate_ids(torch.stack([vis["eval"](decode_image(raw)) for raw in raws]), prompt, num_beams=2,
                             max_length=20, min_length=5)
    decoded = tokenizer.batch_decode(ids[:, prompt.shape[1]:], skip_special_tokens=True)
    assert [captions[decode_meta(raw)["image_id"]] for raw in raws] == [text.strip() for text in decoded]
    from_run = load_model("blip_caption", "demo", checkpoint=run_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), from_run.state_dict().values()))
    with pytest.raises(ValueError, match="holds a BlipCaptioner"):
        load_model("blip_vqa", "demo", checkpoint=exported)
    assert export_main([str(run_dir), str(exported)]) == 1  # refuses to write over an export
    assert "exists and is not empty" in capsys.readouterr().err


def captions_of_split(model: torch.nn.Module, transform, root: Path, split: str) -> dict[str, str]:
    """Every image of the demo's `split` captioned as the recipe's evaluation does (two beams here)."""
    raws = [raw for shard in sorted(root.glob(f"{split}-*.tar")) for raw in iter_shard(str(shard), [])]
    out: dict[str, str] = {}
    for start in range(0, len(raws), 32):
        batch = raws[start:start + 32]
        images = torch.stack([transform(decode_image(raw)) for raw in batch])
        captions = model.generate({"image": images}, num_beams=2, max_length=20, min_length=5)
        out.update({str(decode_meta(raw).get("image_id", raw.key)): c for raw, c in zip(batch, captions)})
    return out


def test_evaluate_names_a_missing_checkpoint(e2e_env: dict[str, str], tmp_path: Path) -> None:
    result = launch(python_cmd("recipe=blip_caption_demo", f"checkpoint={tmp_path}/nothing", f"run_dir={tmp_path}/out",
                               script="launch/evaluate.py"), e2e_env, timeout=120)
    assert result.returncode != 0
    assert f"no complete checkpoint at {tmp_path}/nothing" in result.output
