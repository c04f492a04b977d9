"""Image captioning: train on (image, caption), evaluate by generating one caption per image and
scoring it against all its references with the COCO caption metrics."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vlforge.config.schema import DataConfig
from vlforge.core.distributed import DistEnv
from vlforge.models.protocols import TextGenerator, require
from vlforge.tasks.base import (
    EvalResult,
    ImageTextTask,
    broadcast_object,
    gather_objects,
    lockstep,
    to_device,
)
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

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, data: DataConfig, dist_env: DistEnv, seed: int) -> EvalResult:
        generator = require(model, TextGenerator, "the caption task")
        device = next(model.parameters()).device
        local: dict[str, list[Any]] = {"image_id": [], "caption": [], "references": []}
        pixels: list[torch.Tensor] = []
        for batch, real in lockstep(iter(self.eval_loader(split, data, dist_env, seed)), device):
            batch = to_device(batch, device)
            captions = generator.generate(batch, **self.generate_kwargs)
            if not real:
                continue
            if "captions" not in batch:
                raise ValueError(f"caption evaluation needs reference captions in every sample of data.{split}")
            for row, image_id in enumerate(batch["image_id"]):
                local["image_id"].append(image_id)
                local["caption"].append(captions[row])
                local["references"].append(batch["captions"][row])
                if len(pixels) < self.report_images:
                    pixels.append(batch["image"][row].cpu())
        parts = gather_objects(local)
        predictions = {i: c for part in parts for i, c in zip(part["image_id"], part["caption"])}
        references = {i: r for part in parts for i, r in zip(part["image_id"], part["references"])}
        metrics = caption_metrics(predictions, references) if dist_env.is_main else None
        metrics = broadcast_object(metrics)
        metrics["num_images"] = float(len(predictions))
        # Rank 0's rows come first in the gathered order, so its pixels line up with the first rows.
        rows = [[px, i, c, r] for px, i, c, r in zip(pixels, local["image_id"], local["caption"], local["references"])]
        return EvalResult(metrics=metrics, table_columns=["image", "image_id", "caption", "references"],
                          table_rows=rows, results=[{"image_id": i, "caption": c} for i, c in predictions.items()])
