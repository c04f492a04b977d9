"""Visual instruction tuning (LLaVA): train on conversations, evaluate by the loss over the answers and
by answering each image's first question (generation), scored with VQA accuracy against its reference
answers (or, for captions, with the COCO caption metrics)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vlforge.config.schema import DataConfig
from vlforge.core.distributed import DistEnv
from vlforge.datasets.conversation import IGNORE, ConversationTemplate
from vlforge.datasets.instruct import ConversationCollator, ConversationSample
from vlforge.models.protocols import PromptedGenerator, require
from vlforge.tasks.base import (
    EvalResult,
    Task,
    broadcast_object,
    gather_objects,
    image_text_samples,
    lockstep,
    to_device,
)
from vlforge.tasks.metrics.captioning import caption_metrics
from vlforge.tasks.metrics.vqa import vqa_metrics


class InstructTask(Task):
    """`source`: `conversations` (the samples' own), `captions` or `questions` (conversations made of
    them, vlforge.datasets.conversation). `template`: ConversationTemplate fields (`name: plain` for
    LLaVA's pretraining stage, `chat` after). `generate`: keyword arguments of the model's `generate`."""

    def __init__(self, source: str = "conversations", template: Mapping[str, Any] | None = None,
                 generate: Mapping[str, Any] | None = None, report_images: int = 16) -> None:
        self.source = source
        self.template = ConversationTemplate(**dict(template or {}))
        self.generate_kwargs = dict(generate or {})
        self.report_images = report_images

    def _sample(self, data: DataConfig, train: bool) -> ConversationSample:
        image, _ = image_text_samples(data, train)
        return ConversationSample(image, data.tokenizer, self.template, self.source, data.max_text_len, train=train)

    def train_sample(self, data: DataConfig) -> ConversationSample:
        return self._sample(data, train=True)

    def eval_sample(self, data: DataConfig) -> ConversationSample:
        return self._sample(data, train=False)

    def collator(self, data: DataConfig) -> ConversationCollator:
        return ConversationCollator(data.tokenizer)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, data: DataConfig, dist_env: DistEnv, seed: int) -> EvalResult:
        generator = require(model, PromptedGenerator, "the instruct task")
        device = next(model.parameters()).device
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        local: dict[str, list[Any]] = {"sample_id": [], "image_id": [], "question": [], "prediction": [], "answers": []}
        rows: list[list[Any]] = []
        for batch, real in lockstep(iter(self.eval_loader(split, data, dist_env, seed)), device):
            batch = to_device(batch, device)
            # The image tower runs once for both the loss and the answers.
            batch["image_features"] = generator.image_features(batch["image"])
            # The model's loss is the mean over the scored tokens (the answers); weighted by their count
            # here, so the split's loss is the mean over all its answer tokens.
            mean_loss = model(batch).loss
            predictions = generator.generate(batch, **self.generate_kwargs)
            if not real:
                continue
            scored = (batch["labels"][:, 1:] != IGNORE).sum().double().cpu()
            loss_sum += mean_loss.double().cpu() * scored
            tokens += scored
            local["sample_id"] += batch["sample_id"]
            local["image_id"] += batch["image_id"]
            local["question"] += batch["question"]
            local["prediction"] += predictions
            local["answers"] += batch["answers"]
            for row in range(min(len(predictions), self.report_images - len(rows))):
                rows.append([batch["image"][row].cpu(), batch["question"][row], predictions[row], batch["answers"][row][0]])
        parts = gather_objects({"loss": float(loss_sum), "tokens": float(tokens), **local})
        merged = {key: [v for part in parts for v in part[key]] for key in local}
        total_tokens = sum(part["tokens"] for part in parts)
        metrics = None
        if dist_env.is_main:
            predictions = dict(zip(merged["sample_id"], merged["prediction"]))
            references = dict(zip(merged["sample_id"], merged["answers"]))
            if self.source == "captions":
                metrics = caption_metrics(predictions, references)
            else:
                metrics = {f"answer_{k}": v for k, v in vqa_metrics(predictions, references).items()}
            metrics["loss"] = sum(part["loss"] for part in parts) / max(1.0, total_tokens)
        metrics = broadcast_object(metrics)
        metrics["num_samples"] = float(len(merged["sample_id"]))
        return EvalResult(metrics=metrics, table_columns=["image", "question", "answer", "reference"], table_rows=rows,
                          results=[{"sample_id": s, "image_id": i, "question": q, "answer": p} for s, i, q, p in
                                   zip(merged["sample_id"], merged["image_id"], merged["question"], merged["prediction"])])
