"""Visual question answering: train on (image, question, answer), evaluate by VQAv2 accuracy with
answers generated freely (`mode: generate`) or picked from a candidate list (`mode: rank`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vlforge.config.schema import DataConfig
from vlforge.core.tokenizers import load_tokenizer
from vlforge.datasets.samples import VQASample
from vlforge.models.protocols import AnswerPredictor, AnswerRanker, require
from vlforge.tasks.base import Task, image_text_samples
from vlforge.tasks.evaluation import EvalResult, EvalStep, model_device
from vlforge.tasks.metrics.vqa import vqa_metrics


def load_answer_list(answer_list: str | Sequence[str]) -> list[str]:
    if isinstance(answer_list, str):
        path = Path(answer_list)
        if not path.is_file():
            raise FileNotFoundError(f"task.answer_list: no file {path} (a JSON list of candidate answers)")
        answer_list = json.loads(path.read_text())
    answers = [str(a) for a in answer_list]
    if not answers:
        raise ValueError("task.answer_list is empty")
    return answers


@dataclass
class _VQAState:
    tokenizer: Any
    candidates: dict[str, torch.Tensor] | None  # the answer list, tokenized (mode: rank)
    split: str


class VQATask(Task):
    """`mode: generate` decodes answers (`max_answer_length`, `num_beams`); `mode: rank` scores the
    `answer_list` candidates (a JSON file or a list) and takes the likeliest, pre-filtered to the
    `rank_k` with the likeliest first token (BLIP's VQAv2 evaluation). `train_answers`: `sampled`
    trains each question on one human answer drawn at random (more annotators, more often);
    `weighted` on every distinct answer, its loss weighted by its share of the annotators (LAVIS's
    objective, which the sampled one equals in expectation; see BlipVQA)."""

    text_keys = ("question", "answer")

    def __init__(self, mode: str = "generate", answer_list: str | Sequence[str] | None = None,
                 max_answer_length: int = 10, num_beams: int = 1, rank_k: int = 128, report_images: int = 16,
                 train_answers: str = "sampled") -> None:
        if mode not in ("generate", "rank"):
            raise ValueError(f"task.mode must be 'generate' or 'rank', got {mode!r}")
        if train_answers not in ("sampled", "weighted"):
            raise ValueError(f"task.train_answers must be 'sampled' or 'weighted', got {train_answers!r}")
        self.weighted_answers = train_answers == "weighted"
        if mode == "rank" and answer_list is None:
            raise ValueError("task.mode=rank needs task.answer_list (candidate answers)")
        self.mode, self.max_answer_length, self.num_beams, self.rank_k = mode, max_answer_length, num_beams, rank_k
        self.answer_list = load_answer_list(answer_list) if answer_list is not None else None
        self.report_images = report_images

    def train_sample(self, data: DataConfig) -> VQASample:
        return VQASample(*image_text_samples(data, train=True), train=True, weighted_answers=self.weighted_answers)

    def eval_sample(self, data: DataConfig) -> VQASample:
        return VQASample(*image_text_samples(data, train=False), train=False)

    def _answer(self, model: nn.Module, image: torch.Tensor, questions: dict[str, torch.Tensor],
                candidates: dict[str, torch.Tensor] | None) -> list[str]:
        if self.mode == "generate":
            return require(model, AnswerPredictor, "task.mode=generate").predict_answers({"image": image, **questions}, max_length=self.max_answer_length,
                                         num_beams=self.num_beams)
        best = require(model, AnswerRanker, "task.mode=rank").rank_answers(image, questions["question_input_ids"], questions["question_attention_mask"],
                                  candidates["input_ids"], candidates["attention_mask"], k=self.rank_k,
                                  image_index=questions["question_sample_index"])
        return [self.answer_list[i] for i in best.tolist()]

    table_columns = ("image", "question", "answer", "human_answer")

    def eval_state(self, model: nn.Module, data: DataConfig, split: str) -> _VQAState:
        require(model, AnswerRanker if self.mode == "rank" else AnswerPredictor, f"task.mode={self.mode}")
        tok = load_tokenizer(data.tokenizer)
        candidates = None
        if self.mode == "rank":
            device = model_device(model)
            candidates = {k: v.to(device) for k, v in tok(self.answer_list, padding="longest", return_tensors="pt").items()
                          if k in ("input_ids", "attention_mask")}
        return _VQAState(tok, candidates, split)

    def eval_step(self, model: nn.Module, batch: dict, state: _VQAState, report_rows: int) -> EvalStep:
        if "question_input_ids" not in batch:
            raise ValueError(f"VQA evaluation needs questions in every sample of data.{state.split}")
        # The collator tokenized every question of each image (prompts included, as in training)
        # and recorded each one's image row.
        questions = {key: batch[key] for key in ("question_input_ids", "question_attention_mask", "question_sample_index")}
        predictions = self._answer(model, batch["image"], questions, state.candidates)
        answers = [a for per_image in batch["answers"] for a in per_image]
        shown = max(0, min(len(predictions), report_rows))
        texts = state.tokenizer.batch_decode(batch["question_input_ids"][:shown], skip_special_tokens=True)
        rows = [[batch["image"][owner].cpu(), question, prediction, human[0]] for owner, question, prediction, human
                in zip(batch["question_sample_index"].tolist(), texts, predictions, answers)]
        return EvalStep({"question_id": [i for ids in batch["question_ids"] for i in ids], "prediction": predictions,
                         "answers": answers, "answer_type": [t for types in batch["answer_types"] for t in types]}, rows)

    def summarize(self, records: dict[str, list[Any]], table: list[list[Any]], state: _VQAState) -> EvalResult:
        ids = records.get("question_id", [])
        metrics = vqa_metrics(dict(zip(ids, records.get("prediction", []))), dict(zip(ids, records.get("answers", []))),
                              dict(zip(ids, records.get("answer_type", []))))
        metrics["num_questions"] = float(len(ids))
        return EvalResult(metrics=metrics, table_columns=list(self.table_columns), table_rows=table,
                          results=[{"question_id": q, "answer": p} for q, p in zip(ids, records.get("prediction", []))])
