"""Autoregressive decoding over a KV cache: greedy, sampling (temperature, top-k, top-p) and beam search,
with transformers' logits processing (vlforge.models.layers.sampling) and an optional streamer.

A model supplies `step(new_ids [N, t], cache) -> next-token logits [N, V]`; its image context has
one row per decoded row, or one per image shared by that image's `num_beams` consecutive rows (beam
search reorders rows only within an image). Under ZeRO-3 every forward gathers parameters collectively, so with `sync_ranks` all ranks
keep stepping until every rank has finished (a finished rank feeds padding and ignores the result).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from vlforge.models.layers.sampling import (
    SamplingParams,
    ban_tokens,
    banned_ngram_tokens,
    repetition_penalty,
    warp,
)


class Reorderable(Protocol):
    def reorder(self, index: torch.Tensor) -> None: ...


class Streamer(Protocol):
    """transformers' streamer interface: `put` gets the prompt ids [B, P] once, then each step's new
    ids [B]; `end` is called when decoding stops."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class GenerationConfig:
    """Lengths count the prompt, as in LAVIS and HF (`max_length=20` with a 4-token prompt leaves 16)."""

    max_length: int = 30
    min_length: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are sum(log p) / length ** length_penalty
    do_sample: bool = False  # sampling (num_beams must be 1)
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    temperature: float = 1.0
    repetition_penalty: float = 1.0  # CTRL's: logits of tokens already present divided (or, if negative, multiplied)
    no_repeat_ngram_size: int = 0  # 0: off
    num_return_sequences: int = 1  # rows per prompt: sampled independently, or the best beams

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"generation num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("generation: nucleus sampling (do_sample) needs num_beams=1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation top_p must be in (0, 1], got {self.top_p}")
        if self.min_length > self.max_length:
            raise ValueError(f"generation min_length {self.min_length} exceeds max_length {self.max_length}")
        if self.num_return_sequences < 1 or (not self.do_sample and self.num_return_sequences > self.num_beams):
            raise ValueError(f"generation num_return_sequences={self.num_return_sequences} needs do_sample, or "
                             f"num_beams >= it (got num_beams={self.num_beams})")

    def sampling(self) -> SamplingParams:
        return SamplingParams(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              no_repeat_ngram_size=self.no_repeat_ngram_size)


def _any_rank_running(running: bool, device: torch.device, sync_ranks: bool) -> bool:
    if not (sync_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return running
    flag = torch.tensor([int(running)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _process_logits(logits: torch.Tensor, ids: torch.Tensor, cfg: GenerationConfig, eos_id: int) -> torch.Tensor:
    logits = repetition_penalty(logits.float(), ids, cfg.repetition_penalty)
    # ids go to the host (a sync on a GPU) only for the n-gram rule
    banned = ([banned_ngram_tokens(history, cfg.no_repeat_ngram_size) for history in ids.tolist()]
              if cfg.no_repeat_ngram_size else [[] for _ in range(ids.shape[0])])
    if ids.shape[1] < cfg.min_length:
        banned = [[*tokens, eos_id] for tokens in banned]
    return ban_tokens(logits, banned)


def _sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    probs = warp(logits, cfg.sampling()).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def generate(
    step: Callable[[torch.Tensor, Reorderable], torch.Tensor],
    cache: Reorderable,
    prompt_ids: torch.Tensor,
    cfg: GenerationConfig,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    sync_ranks: bool = True,
    streamer: Streamer | None = None,
) -> torch.Tensor:
    """Decode after `prompt_ids` [B, P]; returns [B * num_return_sequences, <= max_length] ids including
    the prompt, each row ended by eos (or cut at max_length) and padded after it. With `num_beams` K,
    `step` sees B*K rows; with R return sequences and sampling, B*R rows (a prompt's R rows consecutive,
    sharing its context as beams do). `streamer` (not with beam search) sees every step's tokens."""
    if cfg.num_beams > 1:
        if streamer is not None:
            raise ValueError("generation: a streamer needs num_beams=1 (beam search settles its tokens at the end)")
        return _beam_search(step, cache, prompt_ids, cfg, eos_id, pad_id, sync_ranks)
    ids = prompt_ids.repeat_interleave(cfg.num_return_sequences, dim=0)
    step_input = ids
    if streamer is not None:
        streamer.put(ids)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    while ids.shape[1] < cfg.max_length:
        logits = _process_logits(step(step_input, cache), ids, cfg, eos_id)
        next_ids = _sample(logits, cfg, generator) if cfg.do_sample else logits.argmax(dim=-1)
        next_ids = next_ids.masked_fill(done, pad_id)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if streamer is not None:
            streamer.put(next_ids)
        done |= next_ids == eos_id
        if not _any_rank_running(not bool(done.all()), ids.device, sync_ranks):
            break
        step_input = next_ids[:, None]
    if streamer is not None:
        streamer.end()
    return ids


def _beam_search(step: Callable[[torch.Tensor, Reorderable], torch.Tensor], cache: Reorderable,
                 prompt_ids: torch.Tensor, cfg: GenerationConfig, eos_id: int, pad_id: int,
                 sync_ranks: bool) -> torch.Tensor:
    batch, beams, device = prompt_ids.shape[0], cfg.num_beams, prompt_ids.device
    ids = prompt_ids.repeat_interleave(beams, dim=0)
    step_input = ids
    # Only the first beam of each image is live at the start, so the first step does not pick K copies.
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def penalised(score: float, length: int) -> float:
        return score / (length ** cfg.length_penalty)

    while ids.shape[1] < cfg.max_length:
        # The processors act on the log-probabilities, as transformers' beam search (LAVIS's too) applies
        # them: a token banned by min_length is dropped, not its probability spread over the others.
        logprobs = _process_logits(step(step_input, cache).float().log_softmax(dim=-1), ids, cfg, eos_id)
        vocab = logprobs.shape[1]
        candidates = (scores.view(-1, 1) + logprobs).view(batch, beams * vocab)
        top_scores, top_index = candidates.topk(2 * beams, dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_rows, next_tokens, next_scores = [], [], []
        length = ids.shape[1] + 1
        for b in range(batch):
            chosen: list[tuple[int, int, float]] = []
            if not done[b]:
                for score, index in zip(top_scores[b], top_index[b]):
                    row, token = b * beams + index // vocab, index % vocab
                    if token == eos_id:
                        finished[b].append((penalised(score, length), torch.cat([ids[row], ids.new_tensor([eos_id])])))
                    else:
                        chosen.append((row, token, score))
                    if len(chosen) == beams:
                        break
                finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:beams]
                # Done when K hypotheses are finished and no live beam can beat the worst of them.
                if not chosen or (len(finished[b]) == beams and penalised(chosen[0][2], length) <= finished[b][-1][0]):
                    done[b] = True
            if done[b]:
                chosen = [(b * beams + k, pad_id, float("-inf") if k else 0.0) for k in range(beams)]
            for row, token, score in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        index = torch.tensor(next_rows, device=device)
        cache.reorder(index)
        step_input = torch.tensor(next_tokens, device=device)[:, None]
        ids = torch.cat([ids.index_select(0, index), step_input], dim=1)
        scores = torch.tensor(next_scores, device=device).view(batch, beams)
        if not _any_rank_running(not all(done), device, sync_ranks):
            break
    for b in range(batch):
        if not done[b]:  # cut at max_length: the live beams compete with the finished ones
            for k in range(beams):
                if scores[b, k] > float("-inf"):
                    finished[b].append((penalised(float(scores[b, k]), ids.shape[1]), ids[b * beams + k]))
    returned = cfg.num_return_sequences
    best = [seq for hyps in finished for _, seq in sorted(hyps, key=lambda h: h[0], reverse=True)[:returned]]
    out = torch.full((len(best), max(len(seq) for seq in best)), pad_id, dtype=ids.dtype, device=device)
    for b, seq in enumerate(best):
        out[b, : len(seq)] = seq
    return out
