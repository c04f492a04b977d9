"""The static-shape decoding step (eager and compiled) decodes what the growing-cache step decodes, and
the few-query attention that half precision takes on a CPU matches SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.tiny_blip import BOS, PAD, SEP, TEXT, VISION, images
from vlforge.models.blip.caption import BlipCaptioner
from vlforge.models.blip.vqa import BlipVQA
from vlforge.models.layers.bert import FEW_QUERIES, additive_mask, attend
from vlforge.models.layers.generation import GenerationConfig, generate
from vlforge.models.layers.static_decode import StaticDecoding


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def captioner() -> BlipCaptioner:
    torch.manual_seed(0)
    return _perturbed(BlipCaptioner(VISION, TEXT, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD, prompt_length=3))


@pytest.mark.parametrize("beams", [1, 3])
def test_compiled_static_decoding_gives_the_growing_cache_ids(captioner: BlipCaptioner, beams: int) -> None:
    pixels, _ = images(2, seed=11)
    prompt = torch.tensor([[BOS, 6, 7], [BOS, 8, 9]])
    cfg = GenerationConfig(max_length=12, min_length=5, num_beams=beams)
    captioner.compile_decoding = False
    expected = captioner.generate_ids(pixels, prompt, cfg)
    with torch.no_grad():
        context = captioner.image_tokens(pixels)
        eager = StaticDecoding(captioner.text_decoder, captioner.lm_head, context, 12, compiled=False)
        assert torch.equal(generate(eager, eager, prompt, cfg, SEP, PAD, sync_ranks=False), expected)
    captioner.compile_decoding = True
    try:
        got = captioner.generate_ids(pixels, prompt, cfg)
    finally:
        captioner.compile_decoding = False
    assert expected.shape[1] > prompt.shape[1] + 3  # it decoded, not stopped at once
    assert torch.equal(got, expected)


def test_compiled_vqa_answers_attend_to_the_question_mask() -> None:
    torch.manual_seed(0)
    vqa = _perturbed(BlipVQA(VISION, TEXT, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD))
    pixels, _ = images(2, seed=12)
    ids = torch.tensor([[3, 6, 7, 8, SEP], [3, 9, SEP, PAD, PAD]])
    mask = (ids != PAD).long()
    expected = vqa.generate_answer_ids(pixels, ids, mask, max_length=8)
    vqa.compile_decoding = True
    assert torch.equal(vqa.generate_answer_ids(pixels, ids, mask, max_length=8), expected)


def test_a_step_past_the_buffers_is_refused(captioner: BlipCaptioner) -> None:
    context = torch.zeros(1, 17, VISION["embed_dim"])
    with pytest.raises(ValueError, match="41 tokens exceed the decoder's max_len 40"):
        StaticDecoding(captioner.text_decoder, captioner.lm_head, context, 41)
    decoding = StaticDecoding(captioner.text_decoder, captioner.lm_head, context, 3, compiled=False)
    with torch.no_grad():
        decoding(torch.tensor([[BOS, 6, 7]]), decoding)
        with pytest.raises(ValueError, match="one token a step within 3 columns"):
            decoding(torch.tensor([[8]]), decoding)


@pytest.mark.parametrize("queries", [1, FEW_QUERIES])
def test_few_query_attention_in_bfloat16_matches_sdpa(queries: int) -> None:
    g = torch.Generator().manual_seed(queries)
    q, k, v = (torch.randn(2, 4, length, 16, generator=g) for length in (queries, 30, 30))
    keep = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    keep[1, ..., 20:] = False  # the second row's last 10 keys are padding
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(keep, torch.float32))
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    got = attend(*half, additive_mask(keep, torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.03, atol=0.03)
    # Masked keys weigh nothing: changing their values changes nothing.
    half[2][1, :, 20:] = 100.0
    assert torch.equal(attend(*half, additive_mask(keep, torch.bfloat16)), got)
