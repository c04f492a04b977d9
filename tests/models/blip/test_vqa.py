"""BLIP VQA loaded from transformers' BlipForQuestionAnswering: same answer logits, same answers."""
from __future__ import annotations

import pytest
import torch
from transformers import BlipForQuestionAnswering

from tests.models.perturb import noisy
from tests.models.tiny_blip import BOS, PAD, SEP, TEXT, VISION, hf_config, images
from vlforge.models.blip.convert import blip_vqa_from_hf
from vlforge.models.blip.vqa import BlipVQA
from vlforge.models.layers.convert import load_mapped


@pytest.fixture(scope="module")
def pair() -> tuple[BlipForQuestionAnswering, BlipVQA]:
    torch.manual_seed(0)
    hf = noisy(BlipForQuestionAnswering(hf_config()), seed=0)
    hf.decoder_start_token_id = BOS
    with torch.no_grad():  # a random tiny decoder says [SEP] at once; make it talk for a few tokens
        hf.text_decoder.cls.predictions.bias[SEP] = -0.5
    ours = BlipVQA(VISION, TEXT, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD).eval()
    load_mapped(ours, blip_vqa_from_hf(hf.state_dict()))
    return hf, ours


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels, normalised = images(2, seed=7)
    question = torch.tensor([[3, 10, 11, 12, 13, SEP], [3, 14, 15, 16, 17, SEP]])
    return pixels, normalised, question


def test_answer_logits_match(pair) -> None:
    hf, ours = pair
    pixels, normalised, question = _inputs()
    q_mask = torch.ones_like(question)
    answer = torch.tensor([[BOS, 20, 21, SEP], [BOS, 22, SEP, PAD]])
    a_mask = (answer != PAD).long()
    with torch.no_grad():
        image = hf.vision_model(pixel_values=normalised).last_hidden_state
        q_states = hf.text_encoder(input_ids=question, attention_mask=q_mask, encoder_hidden_states=image).last_hidden_state
        expected = hf.text_decoder(input_ids=answer, attention_mask=a_mask, encoder_hidden_states=q_states,
                                   encoder_attention_mask=q_mask).logits
        got = ours.answer_logits(ours.question_states(pixels, question, q_mask), q_mask, answer, a_mask)
    keep = a_mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_greedy_answers_are_identical(pair) -> None:
    hf, ours = pair
    pixels, normalised, question = _inputs()
    with torch.no_grad():
        expected = hf.generate(input_ids=question, pixel_values=normalised, max_length=8, num_beams=1, do_sample=False)
        got = ours.generate_answer_ids(pixels, question, torch.ones_like(question), max_length=8)
    for row_expected, row_got in zip(expected.tolist(), got.tolist()):
        cut = lambda row: row[: row.index(SEP) + 1] if SEP in row else row  # noqa: E731
        assert cut(row_got) == cut(row_expected)
        assert len(cut(row_got)) > 2  # a real decode, not an immediate stop


def test_loss_scores_answer_tokens(pair) -> None:
    _, ours = pair
    pixels, _, question = _inputs()
    answer = torch.tensor([[3, 20, 21, SEP], [3, 22, SEP, PAD]])
    batch = {"image": pixels, "question_input_ids": question, "question_attention_mask": torch.ones_like(question),
             "answer_input_ids": answer, "answer_attention_mask": (answer != PAD).long()}
    out = ours(batch)
    assert set(out.losses) == {"vqa"} and torch.isfinite(out.loss) and out.loss > 0


@pytest.mark.parametrize("k", [None, 3])
def test_rank_mode_picks_the_likeliest_candidate(pair, k) -> None:
    _, ours = pair
    pixels, _, question = _inputs()
    q_mask = torch.ones_like(question)
    # Candidates of different lengths: [CLS] answer [SEP] padded, as the tokenizer gives them.
    candidates = torch.tensor([[3, 20, SEP, PAD], [3, 21, 22, SEP], [3, 23, SEP, PAD], [3, 24, 25, SEP], [3, 26, SEP, PAD]])
    c_mask = (candidates != PAD).long()
    best = ours.rank_answers(pixels, question, q_mask, candidates, c_mask, k=k)
    with torch.no_grad():
        states = ours.question_states(pixels, question, q_mask)
        scores = torch.zeros(2, len(candidates))
        first = torch.zeros(2, len(candidates))
        for c, (ids, mask) in enumerate(zip(candidates, c_mask)):
            ids = ids.clone()
            ids[0] = BOS
            for b in range(2):
                logp = ours.answer_logits(states[b : b + 1], q_mask[b : b + 1], ids[None], mask[None])[0].log_softmax(-1)
                n = int(mask.sum())
                scores[b, c] = sum(logp[t, ids[t + 1]] for t in range(n - 1))
                first[b, c] = logp[0, ids[1]]
    if k is not None:  # only the k with the likeliest first token compete
        keep = first.topk(k, dim=1).indices
        scores = torch.full_like(scores, float("-inf")).scatter(1, keep, scores.gather(1, keep))
    assert best.tolist() == scores.argmax(dim=1).tolist()


def test_albef_layout_fuses_upper_layers_and_has_a_shorter_decoder() -> None:
    # ALBEF VQA: text-only question layers below fusion_layer, a decoder of its own depth.
    text = dict(TEXT, layers=4)
    model = BlipVQA(VISION, text, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD, fusion_layer=2, decoder_layers=2)
    assert [layer.cross_attention is not None for layer in model.text_encoder.layers] == [False, False, True, True]
    assert len(model.text_decoder.layers) == 2
    assert all(layer.cross_attention is not None for layer in model.text_decoder.layers)
    pixels, _, question = _inputs()
    answer = torch.tensor([[BOS, 20, 21, SEP], [BOS, 22, SEP, PAD]])
    out = model({"image": pixels, "question_input_ids": question, "question_attention_mask": torch.ones_like(question),
                 "answer_input_ids": answer, "answer_attention_mask": (answer != PAD).long()})
    out.loss.backward()
    assert model.text_encoder.layers[0].attention.query_key_value.weight.grad is not None  # text-only layers train too
    with pytest.raises(ValueError, match="fusion_layer"):
        BlipVQA(VISION, text, bos_token_id=BOS, eos_token_id=SEP, fusion_layer=4)


def test_questions_about_one_image_share_its_encoding(pair) -> None:
    # question_sample_index: several questions per image give the same states as the image repeated.
    _, ours = pair
    pixels, _, question = _inputs()
    q_mask = torch.ones_like(question)
    index = torch.tensor([1, 0, 1])
    questions = question[[0, 1, 0]]
    with torch.no_grad():
        shared = ours.question_states(pixels, questions, q_mask[[0, 1, 0]], index)
        repeated = ours.question_states(pixels[index], questions, q_mask[[0, 1, 0]])
    torch.testing.assert_close(shared, repeated)
    assert ours.generate_answer_ids(pixels, questions, q_mask[[0, 1, 0]], max_length=5, image_index=index).shape[0] == 3
