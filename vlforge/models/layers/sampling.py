"""Next-token choice with transformers' semantics: the logits processors (repetition penalty,
no-repeat n-grams, a minimum length) and warpers (temperature, top-k, top-p) in the order
`transformers.GenerationMixin` applies them, then argmax or a seeded multinomial draw.

Each row carries its own `SamplingParams` and history, so rows of a batch that joined at different
times (a server's continuous batching) are processed as they would be alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens. `do_sample=False` is greedy (the warpers do not apply);
    `min_new_tokens` forbids the end token until that many tokens were generated."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL's: a seen token's logit divided (or, if negative, multiplied)
    no_repeat_ngram_size: int = 0  # 0: off
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0:
            raise ValueError("top_k, no_repeat_ngram_size and min_new_tokens must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: nothing to process."""
        return (not self.do_sample and self.repetition_penalty == 1.0 and self.no_repeat_ngram_size == 0
                and self.min_new_tokens == 0)


def repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """[N, V] logits with each row's `history` [N, L] tokens penalised (transformers'
    RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def banned_ngram_tokens(history: Sequence[int], size: int) -> list[int]:
    """Tokens that would repeat an n-gram of `size` already in `history` (transformers'
    NoRepeatNGramLogitsProcessor): those that followed the last size-1 tokens before."""
    if size <= 0 or len(history) + 1 < size:
        return []
    prefix = tuple(history[len(history) - size + 1:])
    return [history[i + size - 1] for i in range(len(history) - size + 1)
            if tuple(history[i:i + size - 1]) == prefix]


def ban_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, V] logits with each row's `banned` tokens at -inf, in a new tensor: the logits a step
    returned may be a buffer it reuses (a compiled static step), or rows of one batch."""
    if not any(banned):
        return logits
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for row, tokens in enumerate(banned):
        mask[row, list(tokens)] = True
    return logits.masked_fill(mask, float("-inf"))


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' warpers), on [N, V] logits."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - params.top_p
        remove[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def process(logits: torch.Tensor, history: Sequence[int], new_tokens: int, params: SamplingParams,
            eos_id: int | None) -> torch.Tensor:
    """One row's [V] logits processed as transformers does before choosing: `history` is what the
    repetition penalty and n-gram ban see, `new_tokens` how many were generated so far."""
    logits = logits.float()[None]
    if params.repetition_penalty != 1.0 and history:
        logits = repetition_penalty(logits, torch.tensor([list(history)], device=logits.device), params.repetition_penalty)
    banned = banned_ngram_tokens(history, params.no_repeat_ngram_size)
    if eos_id is not None and new_tokens < params.min_new_tokens:
        banned.append(eos_id)
    logits = ban_tokens(logits, [banned])
    if params.do_sample:
        logits = warp(logits, params)
    return logits[0]


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row's processed [V] logits."""
    if not params.do_sample:
        return int(logits.argmax())
    probs = logits.softmax(dim=-1)
    if not bool(torch.isfinite(probs).all()):  # overflowed logits: the likeliest token rather than a crash
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(logits: torch.Tensor, histories: Sequence[Sequence[int]], new_tokens: Sequence[int],
                params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                eos_id: int | None) -> list[int]:
    """The next token of each of N rows from [N, V] logits, each row by its own params: plain greedy
    rows by one batched argmax, the others one by one."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, row_params in enumerate(params):
        if not row_params.plain_greedy:
            processed = process(logits[row], histories[row], new_tokens[row], row_params, eos_id)
            chosen[row] = choose(processed, row_params, generators[row])
    return chosen
