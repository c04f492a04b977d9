"""A loaded model as the server sees it: what it can do (by Protocol), how a request image becomes its
input, and the batch functions the scheduler runs for the non-streaming endpoints."""
from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from vlforge.core.tokenizers import load_tokenizer, tokenize_texts
from vlforge.models.protocols import (
    AnswerPredictor,
    AnswerRanker,
    FeatureExtractor,
    ImageTextMatcher,
    StepwiseGenerator,
    TextGenerator,
)
from vlforge.tasks.zero_shot import build_zero_shot_classifier, zero_shot_scores

# CLIP's zero-shot convention: probabilities are softmax(100 * cosine) over the labels.
CLASSIFY_LOGIT_SCALE = 100.0


@dataclass
class CaptionJob:
    image: torch.Tensor
    prompt: str | None
    num_beams: int
    max_tokens: int
    min_tokens: int
    repetition_penalty: float


class ModelService:
    """`model` in eval mode on `device`; `cfg` its composed recipe (the eval image transform, the
    tokenizer and the text length are read from it)."""

    def __init__(self, model: nn.Module, cfg: DictConfig, name: str, device: torch.device,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.model, self.cfg, self.name, self.device = model, cfg, name, device
        self.transform = transform
        data = cfg.get("data", {})
        self.tokenizer_name = str(data.get("tokenizer")) if data.get("tokenizer") else None
        self.max_text_len = int(data.get("max_text_len", 64))
        self.stepwise = model if isinstance(model, StepwiseGenerator) else None
        self.generator = model if isinstance(model, TextGenerator) else None
        self.answerer = model if isinstance(model, AnswerPredictor) else None
        self.ranker = model if isinstance(model, AnswerRanker) else None
        self.features = model if isinstance(model, FeatureExtractor) else None
        self.matcher = model if isinstance(model, ImageTextMatcher) else None
        self._request_tokenizer: Any = None

    @property
    def capabilities(self) -> list[str]:
        table = {"chat": self.stepwise is not None or self.answerer is not None,
                 "caption": self.stepwise is not None or self.generator is not None,
                 "vqa": self.answerer is not None or self.ranker is not None,
                 "classify": self.features is not None, "embeddings": self.features is not None,
                 "match": self.matcher is not None}
        return [name for name, able in table.items() if able]

    def batch_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images).to(self.device)

    def _tokenizer(self) -> str:
        if self.tokenizer_name is None:
            raise ValueError("the model's recipe names no tokenizer (data.tokenizer)")
        return self.tokenizer_name

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` by the model's tokenizer (prompt limits, usage), without special tokens.
        Called on the event loop's thread: it has its own copy of the tokenizer, as a fast tokenizer
        may not be used by two threads at once (the worker's encodes with other truncation settings)."""
        if self.tokenizer_name is None:
            return 0
        if self._request_tokenizer is None:
            self._request_tokenizer = copy.deepcopy(load_tokenizer(self.tokenizer_name))
        return len(self._request_tokenizer(text, add_special_tokens=False).input_ids)

    # Each function below is a scheduler Job's `run`: payloads in, one result per payload out.
    @torch.no_grad()
    def run_captions(self, jobs: list[CaptionJob]) -> list[str]:
        """Beam search (or the model's own `generate`) for jobs with equal settings (the job key)."""
        first = jobs[0]
        prompts = {job.prompt for job in jobs}
        if prompts != {None}:
            raise ValueError("a prompt with num_beams > 1 is not supported by this model's generate")
        kwargs: dict[str, Any] = {"num_beams": first.num_beams, "repetition_penalty": first.repetition_penalty}
        offset = self.stepwise.vocabulary().generate_length_offset if self.stepwise is not None else 0
        kwargs.update(max_length=offset + first.max_tokens, min_length=offset + first.min_tokens)
        return self.generator.generate({"image": self.batch_images([j.image for j in jobs])}, **kwargs)

    @torch.no_grad()
    def run_answers(self, jobs: list[tuple[torch.Tensor, str, int, int]]) -> list[str]:
        """Generated answers: (image, question, max_tokens, num_beams) with equal settings."""
        _, _, max_tokens, num_beams = jobs[0]
        samples = {"image": self.batch_images([j[0] for j in jobs]), "text_input": [j[1] for j in jobs]}
        return self.answerer.predict_answers(samples, max_length=max_tokens, num_beams=num_beams)

    @torch.no_grad()
    def run_ranking(self, jobs: list[tuple[torch.Tensor, str, list[str]]]) -> list[int]:
        """The index of the best candidate answer per job (candidates may differ per job)."""
        out = []
        for image, question, answers in jobs:
            q_ids, q_mask = tokenize_texts(self._tokenizer(), [question], self.max_text_len, self.device)
            a_ids, a_mask = tokenize_texts(self._tokenizer(), answers, self.max_text_len, self.device)
            best = self.ranker.rank_answers(self.batch_images([image]), q_ids, q_mask, a_ids, a_mask, k=len(answers))
            out.append(int(best[0]))
        return out

    @torch.no_grad()
    def run_image_embeddings(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        embeds = self.features.extract_features({"image": self.batch_images(images)}, mode="image")["image_embeds"]
        return list(embeds.float().cpu())

    @torch.no_grad()
    def run_text_embeddings(self, texts: list[str]) -> list[torch.Tensor]:
        embeds = self.features.extract_features({"text_input": texts}, mode="text",
                                                max_text_len=self.max_text_len)["text_embeds"]
        return list(embeds.float().cpu())

    @torch.no_grad()
    def run_classify(self, jobs: list[tuple[torch.Tensor, list[str], list[str]]]) -> list[list[float]]:
        """Label probabilities per job: one image batch, a classifier per job's labels and templates."""
        image_embeds = self.features.extract_features({"image": self.batch_images([j[0] for j in jobs])},
                                                      mode="image")["image_embeds"]
        out = []
        for row, (_, labels, templates) in enumerate(jobs):
            classifier = build_zero_shot_classifier(self.features, labels, templates, self._tokenizer(),
                                                    self.max_text_len, self.device)
            scores = zero_shot_scores(image_embeds[row:row + 1], classifier)
            out.append((scores * CLASSIFY_LOGIT_SCALE).softmax(dim=-1)[0].tolist())
        return out

    @torch.no_grad()
    def run_match(self, jobs: list[tuple[torch.Tensor, list[str]]]) -> list[list[tuple[float, float | None]]]:
        """(ITM match logit, ITC cosine) of each text of each job with its image."""
        out = []
        for image, texts in jobs:
            tokens, image_embed = self.matcher.image_features(self.batch_images([image]))
            ids, mask = tokenize_texts(self._tokenizer(), texts, self.max_text_len, self.device)
            logits = self.matcher.itm_match_scores(tokens.expand(len(texts), *tokens.shape[1:]), ids, mask)
            similarity: list[float | None] = [None] * len(texts)
            if self.features is not None:
                text_embeds = self.features.extract_features({"text_input_ids": ids, "text_attention_mask": mask},
                                                             mode="text")["text_embeds"]
                similarity = (F.normalize(text_embeds.float(), dim=-1) @ image_embed.float()[0]).tolist()
            out.append(list(zip(logits.float().tolist(), similarity)))
        return out


def encode_embedding(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """OpenAI's embedding encodings: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def warm_up(service: ModelService, image_size: tuple[int, int] = (64, 64)) -> None:
    """One forward of each capability, so /readyz means the first request pays no one-off cost."""
    image = service.transform(Image.fromarray(np.zeros((*image_size, 3), dtype=np.uint8)))
    with torch.no_grad():
        if service.stepwise is not None:
            started = service.stepwise.start_rows(service.batch_images([image]), [None])
            service.stepwise.step_rows(started.rows, started.logits.argmax(dim=-1))
        if service.features is not None:
            service.run_image_embeddings([image])
