"""Decoding: greedy, beam search (exact where it can be), nucleus sampling, length and repetition
rules, and ranks stepping together under ZeRO-3."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.e2e.conftest import free_port
from vlforge.models.layers.generation import GenerationConfig, _beam_search, _process_logits, generate
from vlforge.models.layers.sampling import SamplingParams

VOCAB, EOS, PAD = 5, 4, 0


class HistoryCache:
    """Holds every row's tokens so far: a model whose next token depends on the whole history shows
    whether beam search reorders its cache with its beams."""

    def __init__(self) -> None:
        self.history: torch.Tensor | None = None

    def reorder(self, index: torch.Tensor) -> None:
        self.history = self.history.index_select(0, index)


def _table(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, VOCAB, generator=gen) * 2, torch.randn(7, VOCAB, generator=gen) * 2


def _model(seed: int = 0):
    last_table, sum_table = _table(seed)
    calls = []

    def step(new_ids: torch.Tensor, cache: HistoryCache) -> torch.Tensor:
        cache.history = new_ids if cache.history is None else torch.cat([cache.history, new_ids], dim=1)
        calls.append(new_ids.shape[0])
        return last_table[cache.history[:, -1]] + sum_table[cache.history.sum(dim=1) % 7]

    return step, calls


def _sequence_score(seed: int, seq: list[int]) -> float:
    last_table, sum_table = _table(seed)
    total = 0.0
    for t in range(1, len(seq)):
        prefix = torch.tensor(seq[:t])
        logits = last_table[prefix[-1]] + sum_table[prefix.sum() % 7]
        total += logits.log_softmax(-1)[seq[t]].item()
    return total


def _manual_greedy(seed: int, prompt: list[int], max_length: int) -> list[int]:
    last_table, sum_table = _table(seed)
    seq = list(prompt)
    while len(seq) < max_length:
        prefix = torch.tensor(seq)
        seq.append(int((last_table[prefix[-1]] + sum_table[prefix.sum() % 7]).argmax()))
        if seq[-1] == EOS:
            break
    return seq


def _strip(row: torch.Tensor) -> list[int]:
    out = row.tolist()
    if EOS in out:
        out = out[: out.index(EOS) + 1]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_greedy_and_one_beam_are_the_argmax_path(seed: int) -> None:
    prompt = torch.tensor([[1], [2], [3]])
    for search in (generate, _beam_search):  # the beam search path with a single beam
        step, _ = _model(seed)
        ids = search(step, HistoryCache(), prompt, GenerationConfig(max_length=8), EOS, PAD, sync_ranks=False)
        for row, start in zip(ids, (1, 2, 3)):
            assert _strip(row) == _manual_greedy(seed, [start], 8)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("seed", range(16))
def test_wide_beam_search_finds_the_best_sequence(seed: int, length_penalty: float) -> None:
    """With as many beams as live prefixes, beam search is exhaustive search: the best sequence by its
    log-probability divided by its length (prompt and eos counted, as LAVIS's transformers did) raised
    to the length penalty."""
    max_length = 4
    best, best_score = None, float("-inf")
    for length in range(1, max_length):
        for tail in itertools.product(range(VOCAB), repeat=length):
            if EOS in tail[:-1] or (len(tail) < max_length - 1 and tail[-1] != EOS):
                continue
            seq = [1, *tail]
            score = _sequence_score(seed, seq) / len(seq) ** length_penalty
            if score > best_score:
                best, best_score = seq, score
    step, _ = _model(seed)
    cfg = GenerationConfig(max_length=max_length, num_beams=VOCAB**2, length_penalty=length_penalty)
    ids = generate(step, HistoryCache(), torch.tensor([[1]]), cfg, EOS, PAD)
    assert _strip(ids[0]) == best


def test_beam_search_scores_at_least_greedy() -> None:
    for seed in range(8):
        step, _ = _model(seed)
        cfg = GenerationConfig(max_length=7, num_beams=3, length_penalty=0.0)
        beam = _strip(generate(step, HistoryCache(), torch.tensor([[2]]), cfg, EOS, PAD)[0])
        greedy = _manual_greedy(seed, [2], 7)
        assert _sequence_score(seed, beam) >= _sequence_score(seed, greedy) - 1e-6


def test_min_length_holds_back_eos_and_max_length_cuts() -> None:
    step, _ = _model(0)
    # A model that always prefers eos.
    eager = lambda ids, cache: torch.nn.functional.one_hot(torch.full((ids.shape[0],), EOS), VOCAB).float() * 100 + step(ids, cache)
    ids = generate(eager, HistoryCache(), torch.tensor([[1], [2]]), GenerationConfig(max_length=9, min_length=5), EOS, PAD)
    for row, start in zip(ids, (1, 2)):
        assert _strip(row)[-1] == EOS and len(_strip(row)) == 6  # eos first allowed once 5 tokens exist
        # Until then the model's best other token, as greedy decoding with eos banned picks it.
        banned = lambda ids, cache: step(ids, cache).index_fill(1, torch.tensor([EOS]), float("-inf"))
        expected = generate(banned, HistoryCache(), torch.tensor([[start]]), GenerationConfig(max_length=5), EOS, PAD)
        assert row[:5].tolist() == expected[0].tolist()
    never = lambda ids, cache: step(ids, cache).index_fill(1, torch.tensor([EOS]), float("-inf"))
    ids = generate(never, HistoryCache(), torch.tensor([[1]]), GenerationConfig(max_length=6), EOS, PAD)
    assert ids.shape == (1, 6) and EOS not in ids.tolist()[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    ids = torch.tensor([[0, 1]])
    out = _process_logits(logits, ids, GenerationConfig(repetition_penalty=2.0), EOS)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, 0.0]]


def test_nucleus_sampling_keeps_to_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    step = lambda ids, cache: probs.log().expand(ids.shape[0], -1)
    prompt = torch.zeros(2000, 1, dtype=torch.long)
    cfg = GenerationConfig(max_length=2, do_sample=True, top_p=0.75)
    drawn = generate(step, HistoryCache(), prompt, cfg, EOS, PAD, generator=torch.Generator().manual_seed(0))[:, 1]
    counts = torch.bincount(drawn, minlength=VOCAB).float() / len(drawn)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 reach 0.75: the rest are outside the nucleus
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.04
    greedy_like = GenerationConfig(max_length=2, do_sample=True, top_p=0.01)
    assert (generate(step, HistoryCache(), prompt[:50], greedy_like, EOS, PAD)[:, 1] == 0).all()
    with pytest.raises(ValueError, match="num_beams=1"):
        GenerationConfig(do_sample=True, num_beams=2)


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        step, calls = _model(0)
        # Rank 0's model ends every row at once; rank 1's never ends before max_length.
        if rank == 0:
            model = lambda ids, cache: step(ids, cache).index_fill(1, torch.tensor([EOS]), 100.0)
        else:
            model = lambda ids, cache: step(ids, cache).index_fill(1, torch.tensor([EOS]), float("-inf"))
        for beams in (1, 2):
            calls.clear()
            ids = generate(model, HistoryCache(), torch.tensor([[1], [2]]), GenerationConfig(max_length=6, num_beams=beams), EOS, PAD)
            torch.save({"calls": len(calls), "ids": ids}, Path(out_dir) / f"rank{rank}_beams{beams}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_step_together_until_all_are_done(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for beams in (1, 2):
        fast, slow = (torch.load(tmp_path / f"rank{r}_beams{beams}.pt") for r in range(2))
        assert fast["calls"] == slow["calls"] == 5  # every rank ran every forward
        assert fast["ids"][:, 1].tolist() == [EOS, EOS]  # yet rank 0's captions ended at once
        assert slow["ids"].shape[1] == 6 and EOS not in slow["ids"].tolist()[0]


class ListStreamer:
    def __init__(self) -> None:
        self.values: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_streamer_sees_the_prompt_then_every_token_as_returned() -> None:
    step, _ = _model()
    streamer = ListStreamer()
    ids = generate(step, HistoryCache(), torch.tensor([[1, 2]]), GenerationConfig(max_length=8), EOS, PAD,
                   sync_ranks=False, streamer=streamer)
    assert streamer.values[0] == [1, 2] and streamer.ended
    assert [v[0] for v in streamer.values[1:]] == ids[0, 2:].tolist()
    with pytest.raises(ValueError) as info:
        generate(step, HistoryCache(), torch.tensor([[1]]), GenerationConfig(num_beams=2), EOS, PAD, streamer=streamer)
    assert str(info.value) == "generation: a streamer needs num_beams=1 (beam search settles its tokens at the end)"


def test_num_return_sequences_samples_independent_rows_and_returns_the_best_beams() -> None:
    probs = torch.tensor([0.05, 0.3, 0.3, 0.3, 0.05])
    step = lambda ids, cache: probs.log().expand(ids.shape[0], -1)
    cfg = GenerationConfig(max_length=4, do_sample=True, top_p=1.0, num_return_sequences=6)
    ids = generate(step, HistoryCache(), torch.tensor([[1], [2]]), cfg, EOS, PAD, generator=torch.Generator().manual_seed(0))
    assert ids.shape[0] == 12 and ids[:6, 0].eq(1).all() and ids[6:, 0].eq(2).all()
    assert len({tuple(r) for r in ids[:6].tolist()}) > 1  # independent draws
    step_b, _ = _model()
    one = generate(step_b, HistoryCache(), torch.tensor([[1]]), GenerationConfig(max_length=6, num_beams=3), EOS, PAD,
                   sync_ranks=False)
    three = generate(step_b, HistoryCache(), torch.tensor([[1]]),
                     GenerationConfig(max_length=6, num_beams=3, num_return_sequences=3), EOS, PAD, sync_ranks=False)
    assert three.shape[0] == 3 and three[0, : one.shape[1]].tolist() == one[0].tolist()
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_return_sequences=2)


@pytest.mark.parametrize("settings, message", [
    ({"num_beams": 0}, "generation num_beams must be >= 1, got 0"),
    ({"do_sample": True, "num_beams": 2}, "generation: nucleus sampling (do_sample) needs num_beams=1"),
    ({"top_p": 0.0}, "generation top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.01}, "generation top_p must be in (0, 1], got 1.01"),
    ({"min_length": 9, "max_length": 8}, "generation min_length 9 exceeds max_length 8"),
    ({"num_return_sequences": 0}, "generation num_return_sequences=0 needs do_sample, or num_beams >= it (got num_beams=1)"),
])
def test_generation_config_names_the_bad_setting(settings: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        GenerationConfig(**settings)
    assert str(info.value) == message


def test_generation_config_accepts_its_boundaries() -> None:
    GenerationConfig(top_p=1.0)
    GenerationConfig(min_length=8, max_length=8)
    GenerationConfig(num_beams=3, num_return_sequences=3)


def test_generation_config_passes_every_sampling_setting_on() -> None:
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=3, top_p=0.8, repetition_penalty=1.3,
                           no_repeat_ngram_size=2)
    assert cfg.sampling() == SamplingParams(do_sample=True, temperature=0.7, top_k=3, top_p=0.8,
                                            repetition_penalty=1.3, no_repeat_ngram_size=2)


def test_no_repeat_ngram_size_bans_a_bigram_seen_before() -> None:
    # A model that ranks the tokens 1 > 2 > 3 > 0 > eos whatever came before: without the ban it says
    # 1 forever; with bigrams banned it takes the best token that does not repeat a bigram.
    ranking = torch.tensor([0.0, 10.0, 9.0, 8.0, -100.0])
    step = lambda ids, cache: ranking.repeat(ids.shape[0], 1)
    cfg = GenerationConfig(max_length=8, no_repeat_ngram_size=2)
    ids = generate(step, HistoryCache(), torch.tensor([[1]]), cfg, EOS, PAD, sync_ranks=False)
    assert ids[0].tolist() == [1, 1, 2, 1, 3, 1, 0, 1]


def test_the_rules_leave_the_logits_the_step_returned_unchanged() -> None:
    # A step that returns the same buffer every time, as a compiled static step may: the bans of one
    # step (a repeated bigram, eos before min_length) must not stay in it for the next.
    ranking = torch.tensor([[0.0, 10.0, 9.0, 8.0, -100.0]])
    kept = ranking.clone()
    cfg = GenerationConfig(max_length=8, min_length=4, no_repeat_ngram_size=2)
    ids = generate(lambda ids, cache: kept, HistoryCache(), torch.tensor([[1]]), cfg, EOS, PAD, sync_ranks=False)
    assert ids[0].tolist() == [1, 1, 2, 1, 3, 1, 0, 1]
    assert torch.equal(kept, ranking)


def test_sampling_draws_from_the_given_generator_only() -> None:
    step, _ = _model()
    cfg = GenerationConfig(max_length=6, do_sample=True, top_p=1.0, temperature=20.0)
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        draws.append(generate(step, HistoryCache(), torch.zeros(16, 1, dtype=torch.long), cfg, EOS, PAD,
                              generator=torch.Generator().manual_seed(5)).tolist())
    assert draws[0] == draws[1]


def test_a_finished_row_stays_padded_and_decoding_stops_once_every_row_ended() -> None:
    # Prompt 1 says eos at once; prompt 2 says 2, 3, then eos.
    script = {1: [EOS], 2: [2, 3, EOS]}

    def step(new_ids: torch.Tensor, cache: HistoryCache) -> torch.Tensor:
        cache.history = new_ids if cache.history is None else torch.cat([cache.history, new_ids], dim=1)
        length = cache.history.shape[1]
        tokens = [script[int(h[0])][min(length - 1, len(script[int(h[0])]) - 1)] for h in cache.history]
        return torch.nn.functional.one_hot(torch.tensor(tokens), VOCAB).float() * 10

    ids = generate(step, HistoryCache(), torch.tensor([[1], [2]]), GenerationConfig(max_length=9), EOS, PAD)
    assert ids.tolist() == [[1, EOS, PAD, PAD], [2, 2, 3, EOS]]
