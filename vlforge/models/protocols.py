"""What tasks, the hub and the server may call on a model, beyond `forward(batch) -> ModelOutput`.

Each capability is a Protocol: a model has it by defining the methods, with no base class and no
registration. `require(model, Capability, what)` is how a caller checks before it runs, so that a
recipe pairing a task with a model that cannot serve it fails with the model's class and the
missing method named, instead of an AttributeError halfway through an evaluation.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, TypeVar, runtime_checkable

import torch

from vlforge.models.layers.decode_rows import DecodeRows, RowStart, Vocabulary


@runtime_checkable
class TextGenerator(Protocol):
    """Text for images: captions (BLIP, BLIP-2) or answers to prompts (LLaVA). `samples["image"]` is
    uint8 [B, 3, H, W]; the keyword arguments are LAVIS's (`num_beams`, `max_length`, `min_length`,
    `use_nucleus_sampling`, `top_p`, `repetition_penalty`)."""

    def generate(self, samples: Mapping[str, Any], **generate_kwargs: Any) -> list[str]: ...


@runtime_checkable
class FeatureExtractor(Protocol):
    """Normalised image and/or text embeddings in one space (`image_embeds`, `text_embeds`), by `mode`
    "image", "text" or "multimodal"."""

    def extract_features(self, samples: dict, mode: str = "multimodal",
                         max_text_len: int = 64) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class AnswerPredictor(Protocol):
    """Free-form answers to the questions about `samples["image"]`."""

    def predict_answers(self, samples: Mapping[str, Any], max_length: int = 10, num_beams: int = 1,
                        max_question_len: int = 35) -> list[str]: ...


@runtime_checkable
class AnswerRanker(Protocol):
    """The index of the best of a fixed list of candidate answers, per question."""

    def rank_answers(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                     answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int | None = 128,
                     image_index: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class ImageTextMatcher(Protocol):
    """Image-text matching: `image_features` gives (image tokens for ITM, normalised ITC embeddings)
    from one tower forward; `itm_match_scores` the "match" logit of each aligned (image, text) row."""

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def itm_match_scores(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class PromptedGenerator(TextGenerator, Protocol):
    """A TextGenerator whose image features can be computed once and passed to both `forward` and
    `generate` as the batch's `image_features` (LLaVA)."""

    def image_features(self, image: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class StepwiseGenerator(Protocol):
    """Decoding one token at a time in a batch that rows join and leave between steps (a server's
    continuous batching): `start_rows` encodes images (uint8 [B,3,H,W], batched) and prefills one
    prompt per image (None: the model's own; what a prompt means is the model's: a caption prefix, a
    question); `step_rows` feeds each row's chosen token and returns the next logits [N, V]. A row's
    greedy tokens equal what `generate` gives its image and prompt alone."""

    def vocabulary(self) -> Vocabulary: ...

    def chat_prompt(self, text: str | None) -> str | None:
        """The prompt a chat message's text becomes: itself for an instruction-following model, None
        (the model's own prompt) for a captioner, which captions whatever it is asked."""
        ...

    def start_rows(self, image: torch.Tensor, prompts: list[str | None]) -> RowStart: ...

    def step_rows(self, rows: DecodeRows, next_ids: torch.Tensor) -> torch.Tensor: ...


Capability = TypeVar("Capability")


def require(model: Any, capability: type[Capability], what: str) -> Capability:
    """`model`, typed as `capability`, or a TypeError naming `what` needs it, the model's class and the
    methods it lacks."""
    if isinstance(model, capability):
        return model
    methods = [name for name in dir(capability) if not name.startswith("_") and callable(getattr(capability, name))]
    missing = [name for name in methods if not callable(getattr(model, name, None))]
    raise TypeError(f"{what} needs a model with {', '.join(methods)} ({capability.__name__}); "
                    f"{type(model).__name__} lacks {', '.join(missing)}")
