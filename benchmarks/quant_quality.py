"""Quality kept by low precision: a trained run's test split scored by its own task with the model held
in fp32, bf16 and int8 (`load_model(quant=...)`), one process, greedy decoding. Prints the task's
metrics per mode, their ratio to fp32, and the share of test items whose text (caption or answer) is
the same as fp32's.

    python benchmarks/quant_quality.py runs/blip_caption_demo runs/blip_vqa_demo [--compile] [--split test]

Targets (issue 21): CIDEr and VQA accuracy within 1% of fp32, the same greedy caption as fp32 on >= 95%
of the test images. Train the runs first (`vlforge train --nproc 2 recipe=blip_caption_demo`, and
`blip_vqa_demo` after `clip_demo`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

MODES = (None, "bf16", "int8")
HEADLINE = {"caption": "cider", "vqa": "accuracy"}


def score(run: str, split: str, compile: bool) -> None:
    from omegaconf import OmegaConf

    from vlforge.config.schema import validate_config
    from vlforge.core.distributed import DistEnv
    from vlforge.hub.load import checkpoint_recipe, load_recipe_model
    from vlforge.trainer.run import build_task

    cfg = checkpoint_recipe(run)
    kind = str(cfg.task._target_).rpartition(".")[2].lower()
    # Greedy: the comparison of texts is about the model's numbers, not a beam search's ties.
    for key in ("task.generate.num_beams", "task.num_beams"):
        if OmegaConf.select(cfg, key) is not None:
            OmegaConf.update(cfg, key, 1)
    data, task = validate_config(cfg).data, build_task(cfg)
    single = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=0,
                     launcher="none")
    texts: dict[str | None, dict] = {}
    rows = []
    for quant in MODES:
        model = load_recipe_model(cfg, run, quant=quant)
        if compile and hasattr(model, "compile_decoding"):
            model.compile_decoding = True
        start = time.perf_counter()
        result = task.evaluate(model, split, data, single, int(cfg.trainer.seed))
        seconds = time.perf_counter() - start
        key = "caption" if "caption" in (result.results[0] if result.results else {}) else "answer"
        id_key = "image_id" if key == "caption" else "question_id"
        texts[quant] = {r[id_key]: r[key] for r in result.results}
        rows.append((quant or "fp32", result.metrics, seconds))
    headline = next((name for k, name in HEADLINE.items() if k in kind), None) or sorted(rows[0][1])[0]
    base = rows[0][1][headline]
    print(f"\n### {cfg.name}: {split} split, greedy ({environment()})\n")
    print(f"| model | {headline} | vs fp32 | same text as fp32 | eval time (s) |")
    print("|---|---|---|---|---|")
    for (name, metrics, seconds), quant in zip(rows, MODES):
        same = sum(texts[quant][i] == t for i, t in texts[None].items()) / max(1, len(texts[None]))
        print(f"| {name} | {metrics[headline]:.4f} | **{metrics[headline] / base:.4f}x** | **{same:.1%}** "
              f"({len(texts[None])}) | {seconds:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trained run directories (a captioner, a VQA model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--compile", action="store_true", help="decode through the compiled static step")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    for run in args.runs:
        score(run, args.split, args.compile)


if __name__ == "__main__":
    main()
