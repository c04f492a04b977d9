"""Token choice matches transformers' own logits processors and warpers, run for real on the same logits."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlforge.models.layers.sampling import SamplingParams, banned_ngram_tokens, next_tokens, process

VOCAB, EOS = 40, 3


def _reference(logits: torch.Tensor, history: list[int], prompt: int, params: SamplingParams) -> torch.Tensor:
    """transformers' processors in GenerationMixin's order, over one row."""
    steps = [RepetitionPenaltyLogitsProcessor(params.repetition_penalty)]
    if params.no_repeat_ngram_size:
        steps.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.min_new_tokens:
        steps.append(MinNewTokensLengthLogitsProcessor(prompt, params.min_new_tokens, EOS))
    if params.do_sample:
        steps.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            steps.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            steps.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList(steps)(torch.tensor([history]), logits[None].clone())[0]


@pytest.mark.parametrize("params", [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7, no_repeat_ngram_size=2),
    SamplingParams(no_repeat_ngram_size=3, min_new_tokens=4),
    SamplingParams(do_sample=True, temperature=0.7, top_k=7),
    SamplingParams(do_sample=True, temperature=1.5, top_p=0.8, repetition_penalty=1.2),
    SamplingParams(do_sample=True, top_k=12, top_p=0.5, no_repeat_ngram_size=2, min_new_tokens=2),
])
def test_processing_equals_transformers(params: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(VOCAB, generator=generator) * 3
        # Histories with repeats, so n-gram bans and penalties bite; a 2-token prompt.
        history = torch.randint(0, 8, (int(torch.randint(2, 12, (1,), generator=generator)),), generator=generator).tolist()
        new_tokens = len(history) - 2
        expected = _reference(logits, history, 2, params)
        got = process(logits, history, new_tokens, params, EOS)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (trial, params)
        finite = ~torch.isinf(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-6, atol=1e-6)


def test_no_repeat_ngram_bans_what_followed_the_same_prefix() -> None:
    # bigrams (5, 6), (6, 5), (5, 7); the last token 5 was followed by 6 and 7
    assert sorted(banned_ngram_tokens([5, 6, 5, 7, 5], 2)) == [6, 7]
    assert banned_ngram_tokens([5, 6], 3) == []


def test_rows_choose_independently_by_their_own_params() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [0.0, 5.0, 1.0, 4.9]])
    greedy = SamplingParams()
    penalised = SamplingParams(repetition_penalty=2.0)  # 5.0 seen -> 2.5, so 4.9 wins
    chosen = next_tokens(logits, [[1], [1]], [1, 1], [greedy, penalised], [None, None], eos_id=None)
    assert chosen == [1, 3]


def test_processing_leaves_the_batch_logits_unchanged() -> None:
    # The server hands each row a view of the step's logits: a row's bans stay out of them.
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9, 2.0], [0.0, 5.0, 1.0, 4.9, 2.0]])
    before = logits.clone()
    banning = SamplingParams(no_repeat_ngram_size=2, min_new_tokens=5)  # bigram (1, 1) seen: 1 banned; eos 3 too early
    chosen = next_tokens(logits, [[1, 1], [1, 1]], [1, 1], [banning, banning], [None, None], eos_id=3)
    assert chosen == [4, 4]
    assert torch.equal(logits, before)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(dim=0)
    params = SamplingParams(do_sample=True, top_k=2)
    draws = [next_tokens(logits[None], [[]], [0], [params], [torch.Generator().manual_seed(s)], None)[0]
             for s in range(400)]
    again = [next_tokens(logits[None], [[]], [0], [params], [torch.Generator().manual_seed(s)], None)[0]
             for s in range(400)]
    assert draws == again
    assert set(draws) == {0, 1}  # top-2 only
    share = draws.count(0) / len(draws)
    assert abs(share - 1 / (1 + torch.e ** -1)) < 0.07  # e^2 / (e^2 + e^1)


def test_invalid_params_name_the_field() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0.0)
