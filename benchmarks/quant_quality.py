"""Quality kept by low precision: a trained run's test split scored by its own task with the model held
in fp32, bf16 and int8 (`load_model(quant=...)`), one process, greedy decoding. Prints the task's
metrics per mode, their ratio to fp32, and the share of test items whose text (caption or answer) is
the same as fp32's.

    python benchmarks/quant_quality.py runs/blip_caption_demo runs/blip_vqa_demo [--compile] [--split test]

Targets (issue 21): CIDEr and VQA accuracy within 1% of fp32, the same greedy caption as fp32 on >= 95%
of the test images. For a captioner it also prints, for the captions int8 changes, how close fp32's
own choice was at the first token that differs (its top-two logit margin), against the smallest
margin along the captions that stay the same: changed captions are the ones fp32 nearly tied. Train the runs first (`vlforge train --nproc 2 recipe=blip_caption_demo`, and
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


def _greedy_with_margins(model: torch.nn.Module, image: torch.Tensor, cfg: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy caption ids [B, L], the top-two logit margin of each new token [B, steps]), eos barred
    where min_length bars it, as `generate` does."""
    from vlforge.models.blip.decoder import decoder_step
    from vlforge.models.layers.generation import generate

    prompt = torch.tensor([model.prompt_ids()] * image.shape[0])
    inner = decoder_step(model.text_decoder, model.lm_head, model.image_tokens(image))
    margins = []

    def step(ids: torch.Tensor, cache: object) -> torch.Tensor:
        logits = inner(ids, cache)
        scored = logits.float().clone()
        if prompt.shape[1] + len(margins) < cfg.min_length:
            scored[:, model.eos_token_id] = float("-inf")
        top = scored.topk(2, dim=-1).values
        margins.append(top[:, 0] - top[:, 1])
        return logits

    ids = generate(step, model.text_decoder.new_cache(), prompt, cfg, model.eos_token_id, model.pad_token_id,
                   sync_ranks=False)
    return ids[:, prompt.shape[1]:], torch.stack(margins, dim=1)


@torch.no_grad()
def caption_margins(cfg: object, data: object, task: object, models: dict, split: str, single: object) -> str:
    from vlforge.models.layers.generation import GenerationConfig

    kwargs = task.generate_kwargs
    generation = GenerationConfig(max_length=kwargs.get("max_length", 30), min_length=kwargs.get("min_length", 10))
    changed, kept = [], []
    for batch in task.eval_loader(split, data, single, int(cfg.trainer.seed)):
        ids, margins = _greedy_with_margins(models[None], batch["image"], generation)
        other, _ = _greedy_with_margins(models["int8"], batch["image"], generation)
        length = min(ids.shape[1], other.shape[1])
        for row in range(ids.shape[0]):
            differs = (ids[row, :length] != other[row, :length]).nonzero()
            if len(differs) or ids.shape[1] != other.shape[1] and not torch.equal(ids[row], other[row]):
                first = int(differs[0]) if len(differs) else length
                changed.append(float(margins[row, min(first, margins.shape[1] - 1)]))
            else:
                kept.append(float(margins[row].min()))
    def med(values: list[float]) -> float:
        return float(torch.tensor(values).median()) if values else float("nan")

    return (f"int8 changed {len(changed)} of {len(changed) + len(kept)} greedy captions; fp32's top-two margin at "
            f"the first changed token: median {med(changed):.3f}, max {max(changed, default=float('nan')):.3f} "
            f"logits; along the unchanged captions, the smallest margin: median {med(kept):.3f}")


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
    models = {}
    for quant in MODES:
        model = models[quant] = load_recipe_model(cfg, run, quant=quant)
        if compile and hasattr(model, "compile_decoding"):
            model.compile_decoding = True
        start = time.perf_counter()
        result = task.evaluate(model, split, data, single, int(cfg.trainer.seed))
        seconds = time.perf_counter() - start
        key = "caption" if "caption" in (result.results[0] if result.results else {}) else "answer"
        id_key = "image_id" if key == "caption" else "question_id"
        texts[quant] = {r[id_key]: r[key] for r in result.results}
        rows.append((quant or "fp32", result.metrics, seconds))
    headline = next((name for k, name in HEADLINE.items() if k in kind), None) or min(rows[0][1])
    base = rows[0][1][headline]
    print(f"\n### {cfg.name}: {split} split, greedy ({environment()})\n")
    print(f"| model | {headline} | vs fp32 | same text as fp32 | eval time (s) |")
    print("|---|---|---|---|---|")
    for (name, metrics, seconds), quant in zip(rows, MODES):
        same = sum(texts[quant][i] == t for i, t in texts[None].items()) / max(1, len(texts[None]))
        print(f"| {name} | {metrics[headline]:.4f} | **{metrics[headline] / base:.4f}x** | **{same:.1%}** "
              f"({len(texts[None])}) | {seconds:.1f} |", flush=True)
    if hasattr(models[None], "prompt_ids"):  # a captioner
        print("\n" + caption_margins(cfg, data, task, models, split, single))


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
