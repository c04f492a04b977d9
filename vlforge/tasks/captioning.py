"""Image captioning: train on (image, caption), evaluate by generating one caption per image and
scoring it against all its references with the COCO caption metrics."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from vlforge.config.schema import DataConfig
from vlforge.models.protocols import TextGenerator, require
from vlforge.tasks.base import ImageTextTask
from vlforge.tasks.evaluation import EvalResult, EvalStep
from vlforge.tasks.metrics.captioning import caption_metrics


class CaptionTask(ImageTextTask):
    """`generate` holds the keyword arguments of the model's `generate(samples, ...)` (for BLIP:
    num_beams, max_length, min_length, use_nucleus_sampling, top_p, repetition_penalty).

    Every rank generates for its share of the split in lockstep (ZeRO-3 gathers parameters at every
    decoding step, so ranks decode together until all are done); rank 0 scores the gathered
    captions, and the metrics reach every rank.
    """

    def __init__(self, generate: Mapping[str, Any] | None = None, report_images: int = 16) -> None:
        self.generate_kwargs = dict(generate or {})
        self.report_images = report_images

    table_columns = ("image", "image_id", "caption", "references")

    def eval_state(self, model: nn.Module, data: DataConfig, split: str) -> tuple[TextGenerator, str]:
        return require(model, TextGenerator, "the caption task"), split

    def eval_step(self, model: nn.Module, batch: dict, state: tuple[TextGenerator, str], report_rows: int) -> EvalStep:
        generator, split = state
        captions = generator.generate(batch, **self.generate_kwargs)
        if "captions" not in batch:
            raise ValueError(f"caption evaluation needs reference captions in every sample of data.{split}")
        rows = [[batch["image"][row].cpu(), image_id, captions[row], batch["captions"][row]]
                for row, image_id in enumerate(batch["image_id"][:report_rows])]
        return EvalStep({"image_id": list(batch["image_id"]), "caption": captions, "references": list(batch["captions"])},
                        rows)

    def summarize(self, records: dict[str, list[Any]], table: list[list[Any]], state: Any) -> EvalResult:
        predictions = dict(zip(records.get("image_id", []), records.get("caption", [])))
        references = dict(zip(records.get("image_id", []), records.get("references", [])))
        metrics = {**caption_metrics(predictions, references), "num_images": float(len(predictions))}
        return EvalResult(metrics=metrics, table_columns=list(self.table_columns), table_rows=table,
                          results=[{"image_id": i, "caption": c} for i, c in predictions.items()])
