"""Visual instruction tuning (LLaVA): train on conversations, evaluate by the loss over the answers and
by answering every question of each sample (generation; see ConversationSample for the context each
question gets), scored with VQA accuracy against its reference answers (or, for captions, with the
COCO caption metrics)."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from vlforge.config.schema import DataConfig
from vlforge.datasets.conversation import IGNORE, ConversationTemplate
from vlforge.datasets.instruct import ConversationCollator, ConversationSample
from vlforge.models.protocols import PromptedGenerator, require
from vlforge.tasks.base import Task, image_text_samples
from vlforge.tasks.evaluation import EvalResult, EvalStep
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

    table_columns = ("image", "question", "answer", "reference")

    def eval_state(self, model: nn.Module, data: DataConfig, split: str) -> PromptedGenerator:
        return require(model, PromptedGenerator, "the instruct task")

    def eval_step(self, model: nn.Module, batch: dict, state: PromptedGenerator, report_rows: int) -> EvalStep:
        # The image tower runs once for both the loss and the answers.
        features = state.image_features(batch["image"])
        batch["image_features"] = features
        # The model's loss is the mean over the scored tokens (the answers); weighted by their count
        # here, so the split's loss is the mean over all its answer tokens.
        mean_loss = model(batch).loss
        # Every question of every image, each with its image's features.
        rows = batch["prompt_row"].to(features.device)
        predictions = state.generate({"image": batch["image"][rows.to(batch["image"].device)],
                                      "image_features": features[rows],
                                      "prompt_input_ids": batch["prompt_input_ids"],
                                      "prompt_attention_mask": batch["prompt_attention_mask"]}, **self.generate_kwargs)
        image_rows = batch["prompt_row"].tolist()
        scored = float((batch["labels"][:, 1:] != IGNORE).sum())
        table = [[batch["image"][image_rows[i]].cpu(), batch["question"][i], predictions[i], batch["answers"][i][0]]
                 for i in range(min(len(predictions), report_rows))]
        return EvalStep({"loss_sum": [float(mean_loss.double()) * scored], "tokens": [scored],
                         "sample_id": list(batch["sample_id"]),
                         "image_id": [batch["image_id"][row] for row in image_rows],
                         "question": list(batch["question"]), "prediction": predictions,
                         "answers": list(batch["answers"])}, table)

    def summarize(self, records: dict[str, list[Any]], table: list[list[Any]], state: Any) -> EvalResult:
        ids = records.get("sample_id", [])
        predictions = dict(zip(ids, records.get("prediction", [])))
        references = dict(zip(ids, records.get("answers", [])))
        if self.source == "captions":
            metrics = caption_metrics(predictions, references)
        else:
            metrics = {f"answer_{k}": v for k, v in vqa_metrics(predictions, references).items()}
        metrics["loss"] = sum(records.get("loss_sum", [])) / max(1.0, sum(records.get("tokens", [])))
        metrics["num_samples"] = float(len(ids))
        return EvalResult(metrics=metrics, table_columns=list(self.table_columns), table_rows=table,
                          results=[{"sample_id": s, "image_id": i, "question": q, "answer": p} for s, i, q, p in
                                   zip(ids, records.get("image_id", []), records.get("question", []),
                                       records.get("prediction", []))])
