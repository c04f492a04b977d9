"""BLIP captioning loaded from a transformers BlipForConditionalGeneration: same logits, same captions."""
from __future__ import annotations

import pytest
import torch
from transformers import BlipForConditionalGeneration

from tests.models.perturb import noisy
from tests.models.tiny_blip import BOS, PAD, SEP, TEXT, VISION, hf_config, images
from vlforge.models.blip.caption import BlipCaptioner
from vlforge.models.blip.convert import blip_caption_from_hf
from vlforge.models.layers.convert import load_mapped


@pytest.fixture(scope="module")
def pair() -> tuple[BlipForConditionalGeneration, BlipCaptioner]:
    torch.manual_seed(0)
    hf = noisy(BlipForConditionalGeneration(hf_config()), seed=0)
    ours = BlipCaptioner(VISION, TEXT, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD, prompt_length=3).eval()
    load_mapped(ours, blip_caption_from_hf(hf.state_dict()))
    return hf, ours


def _images(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return images(batch, seed=3)


def test_image_tokens_match(pair) -> None:
    hf, ours = pair
    pixels, normalised = _images()
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=normalised).last_hidden_state
        got = ours.image_tokens(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_caption_logits_match(pair) -> None:
    hf, ours = pair
    pixels, normalised = _images()
    ids = torch.tensor([[BOS, 7, 8, 9, 10, 11, SEP], [BOS, 7, 8, 12, SEP, PAD, PAD]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        expected = hf(pixel_values=normalised, input_ids=ids, attention_mask=mask).logits
        got = ours.logits(ours.image_tokens(pixels), ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_greedy_captions_are_identical(pair) -> None:
    hf, ours = pair
    pixels, normalised = _images(3)
    prompt = torch.tensor([[BOS, 7, 8, SEP]] * 3)  # HF's generate drops the trailing [SEP]
    with torch.no_grad():
        expected = hf.generate(pixel_values=normalised, input_ids=prompt.clone(), max_length=12, min_length=0,
                               num_beams=1, do_sample=False)
        got = ours.generate_ids(pixels, prompt[:, :-1], max_length=12)
    for row_expected, row_got in zip(expected.tolist(), got.tolist()):
        trim = lambda row: row[: row.index(SEP) + 1] if SEP in row[3:] else row  # noqa: E731
        assert trim(row_got) == trim(row_expected)


def test_training_loss_ignores_prompt_and_padding(pair) -> None:
    _, ours = pair
    pixels, _ = _images()
    ids = torch.tensor([[BOS, 7, 8, 9, 10, SEP], [BOS, 7, 8, 9, SEP, PAD]])
    batch = {"image": pixels, "text_input_ids": ids, "text_attention_mask": (ids != PAD).long()}
    ours.label_smoothing = 0.0
    loss = ours(batch).loss
    with torch.no_grad():
        logits = ours.logits(ours.image_tokens(pixels), ids, batch["text_attention_mask"]).log_softmax(-1)
    # Scored: the tokens after the 3-token prompt ([DEC] a picture-of), up to and including [SEP].
    picks = [logits[0, 2, 9], logits[0, 3, 10], logits[0, 4, SEP], logits[1, 2, 9], logits[1, 3, SEP]]
    torch.testing.assert_close(loss, -torch.stack(picks).mean(), rtol=1e-5, atol=1e-6)
    # A per-row count from the collator (data.prompts) wins over the model's own.
    batch["text_prompt_length"] = torch.tensor([2, 4])
    picks = [logits[0, 1, 8], logits[0, 2, 9], logits[0, 3, 10], logits[0, 4, SEP], logits[1, 3, SEP]]
    torch.testing.assert_close(ours(batch).loss, -torch.stack(picks).mean(), rtol=1e-5, atol=1e-6)
    ours.label_smoothing = 0.1


@pytest.mark.parametrize("min_length", [0, 8])
def test_beam_search_captions_are_identical(pair, min_length: int) -> None:
    hf, ours = pair
    pixels, normalised = _images(3)
    prompt = torch.tensor([[BOS, 7, 8, SEP]] * 3)
    # No length normalisation: vlforge divides a hypothesis's log-probability by its length with the
    # prompt, as LAVIS's transformers did (tests/models/blip/test_lavis_outputs.py checks beams against
    # LAVIS); transformers 4.37 and later divide by the generated length only.
    with torch.no_grad():
        expected = hf.generate(pixel_values=normalised, input_ids=prompt.clone(), max_length=12, min_length=min_length,
                               num_beams=3, do_sample=False, length_penalty=0.0)
        got = ours.generate_ids(pixels, prompt[:, :-1], max_length=12, min_length=min_length, num_beams=3,
                                length_penalty=0.0)
    for row_expected, row_got in zip(expected.tolist(), got.tolist()):
        trim = lambda row: row[: row.index(SEP) + 1] if SEP in row[3:] else row  # noqa: E731
        assert trim(row_got) == trim(row_expected)


def test_beams_share_an_image_so_prompts_and_images_must_pair(pair) -> None:
    _, ours = pair
    pixels, _ = _images(3)
    prompt = torch.tensor([[BOS, 7, 8]] * 2)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        ours.generate_ids(pixels, prompt, max_length=12, num_beams=3)
