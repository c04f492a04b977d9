"""LAVIS BLIP checkpoints (caption, retrieval, pretrain, VQA): every key accounted for, the same
outputs as the reference modules, and a pretraining checkpoint starting a captioner.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from tests.models.lavis_reference import (
    EMBED,
    QUEUE,
    TEXT,
    TEXT_WIDTH,
    VISION,
    VISION_WIDTH,
    apply_linear,
    assert_close,
    make_decoder,
    make_encoder,
    make_linear,
    make_vit,
    text_inputs,
    under_prefix,
)
from tests.models.tiny_blip import images
from vlforge.hub.weights import init_weights
from vlforge.models.blip.caption import BlipCaptioner
from vlforge.models.blip.convert import (
    blip_caption_from_lavis,
    blip_pretrain_from_lavis,
    blip_retrieval_from_lavis,
    blip_vqa_from_lavis,
)
from vlforge.models.blip.pretrain import BlipPretrain
from vlforge.models.blip.retrieval import BlipRetrieval
from vlforge.models.blip.vqa import BlipVQA
from vlforge.models.layers.convert import load_mapped


def _blip_itc_itm_state_dict(vit: nn.Module, encoder: nn.Module) -> dict[str, torch.Tensor]:
    lavis = {**under_prefix("visual_encoder.", vit), **under_prefix("text_encoder.", encoder)}
    for name, (fan_in, fan_out) in {"vision_proj": (VISION_WIDTH, EMBED), "text_proj": (TEXT_WIDTH, EMBED),
                                    "itm_head": (TEXT_WIDTH, 2)}.items():
        lavis.update(under_prefix(f"{name}.", make_linear(fan_in, fan_out, len(lavis))))
    # Training state that vlforge's BLIP has no counterpart for (see blip_retrieval_from_lavis).
    for name in ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"):
        lavis.update({k.replace(name[:-2] + ".", name + ".", 1): v + 1.0 for k, v in lavis.items()
                      if k.startswith(name[:-2] + ".")})
    lavis.update(temp=torch.tensor(0.0612), image_queue=torch.randn(EMBED, QUEUE), text_queue=torch.randn(EMBED, QUEUE),
                 idx_queue=torch.full((1, QUEUE), -100), queue_ptr=torch.zeros(1, dtype=torch.long))
    return lavis


@pytest.fixture(scope="module")
def retrieval() -> dict:
    vit, encoder = make_vit(40), make_encoder(41)
    lavis = _blip_itc_itm_state_dict(vit, encoder)
    ours = BlipRetrieval(VISION, TEXT, embed_dim=EMBED).eval()
    load_mapped(ours, blip_retrieval_from_lavis(lavis))
    return {"lavis": lavis, "vit": vit, "encoder": encoder, "ours": ours}


def test_blip_retrieval_matches_reference_modules(retrieval) -> None:
    ours, lavis = retrieval["ours"], retrieval["lavis"]
    pixels, normalised = images(2, seed=6)
    ids, mask = text_inputs()
    keep = mask.bool()
    with torch.no_grad():
        tokens = retrieval["vit"].forward_features(normalised)
        got_tokens, got_image = ours.image_features(pixels)
        assert_close(got_tokens, tokens)
        assert_close(got_image, F.normalize(apply_linear(lavis, "vision_proj", tokens[:, 0]), dim=-1))
        text = retrieval["encoder"](input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close(ours.text_encoder(ids, mask)[keep], text[keep])
        assert_close(ours.encode_text(ids, mask), F.normalize(apply_linear(lavis, "text_proj", text[:, 0]), dim=-1))
        fused = retrieval["encoder"](input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens).last_hidden_state
        assert_close(ours.itm_logits(tokens, ids, mask), apply_linear(lavis, "itm_head", fused[:, 0]))
    assert ours.logit_scale.log_scale.item() == (-torch.log(lavis["temp"].double())).float().item()


@pytest.mark.parametrize("key", ["text_encoder_mm.embeddings.word_embeddings.weight", "visual_encoder.fc_norm.weight"])
def test_blip_retrieval_unknown_key_is_named(retrieval, key: str) -> None:
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        blip_retrieval_from_lavis({**retrieval["lavis"], key: torch.zeros(1)})


@pytest.mark.parametrize("key", ["vision_proj.bias", "text_encoder.encoder.layer.0.crossattention.self.value.weight"])
def test_blip_retrieval_missing_key_is_named(retrieval, key: str) -> None:
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        blip_retrieval_from_lavis({k: v for k, v in retrieval["lavis"].items() if k != key})


def test_blip_image_text_matching_has_no_temperature(retrieval) -> None:
    # LAVIS's BlipITM keeps none (its ITC score is the cosine); the model keeps its initial one.
    converted = blip_retrieval_from_lavis({k: v for k, v in retrieval["lavis"].items() if k != "temp"})
    assert "logit_scale.log_scale" not in converted and "itm_head.weight" in converted


def test_blip_caption_matches_reference_modules() -> None:
    vit, decoder = make_vit(50), make_decoder(51)
    lavis = {**under_prefix("visual_encoder.", vit), **under_prefix("text_decoder.", decoder)}
    ours = BlipCaptioner(VISION, TEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0, prompt_length=1).eval()
    load_mapped(ours, blip_caption_from_lavis(lavis))
    pixels, normalised = images(2, seed=7)
    ids, mask = text_inputs()
    with torch.no_grad():
        tokens = vit.forward_features(normalised)
        assert_close(ours.image_tokens(pixels), tokens)
        expected = decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens, is_decoder=True).logits
        assert_close(ours.logits(tokens, ids, mask)[mask.bool()], expected[mask.bool()])


def test_blip_vqa_matches_reference_modules() -> None:
    vit, encoder, decoder = make_vit(60), make_encoder(61), make_decoder(62, encoder_width=TEXT_WIDTH)
    lavis = {**under_prefix("visual_encoder.", vit), **under_prefix("text_encoder.", encoder), **under_prefix("text_decoder.", decoder)}
    ours = BlipVQA(VISION, TEXT, bos_token_id=1, eos_token_id=2).eval()
    load_mapped(ours, blip_vqa_from_lavis(lavis))
    pixels, normalised = images(2, seed=8)
    # Unpadded questions: transformers 5's BLIP text cross-attention ignores `encoder_attention_mask`
    # (BlipTextAttention does not pass it on), so the reference cannot mask padded question tokens.
    q_ids = torch.tensor([[1, 7, 8, 9, 10, 2], [1, 12, 13, 14, 15, 2]])
    q_mask = torch.ones_like(q_ids)
    a_ids = torch.tensor([[1, 20, 21, 2], [1, 22, 2, 0]])
    a_mask = (a_ids != 0).long()
    with torch.no_grad():
        tokens = vit.forward_features(normalised)
        question = encoder(input_ids=q_ids, attention_mask=q_mask, encoder_hidden_states=tokens,
                           encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long)).last_hidden_state
        got_question = ours.question_states(pixels, q_ids, q_mask)
        assert_close(got_question[q_mask.bool()], question[q_mask.bool()])
        expected = decoder(input_ids=a_ids, attention_mask=a_mask, encoder_hidden_states=question,
                           encoder_attention_mask=q_mask, is_decoder=True).logits
        got = ours.answer_logits(got_question, q_mask, a_ids, a_mask)
        assert_close(got[a_mask.bool()], expected[a_mask.bool()])


def _tie_like_lavis(encoder: BlipTextModel, decoder: BlipTextLMHeadModel) -> None:
    """LAVIS's tie_encoder_decoder_weights(encoder, decoder.bert, skip "/attention"): the decoder
    uses the encoder's embeddings, cross-attention and feed-forward; only self-attention differs."""
    with torch.no_grad():
        params = dict(decoder.bert.named_parameters())
        for name, value in encoder.named_parameters():
            if ".attention." not in name:
                params[name].copy_(value)


def test_blip_pretrain_loads_shared_weights_once_and_matches() -> None:
    vit, encoder, decoder = make_vit(70), make_encoder(71), make_decoder(72)
    _tie_like_lavis(encoder, decoder)
    lavis = {**_blip_itc_itm_state_dict(vit, encoder), **under_prefix("text_decoder.", decoder)}
    del lavis["idx_queue"]  # LAVIS's pretraining model has no id queue
    ours = BlipPretrain(VISION, TEXT, embed_dim=EMBED, bos_token_id=1, eos_token_id=2).eval()
    load_mapped(ours, blip_pretrain_from_lavis(lavis))
    pixels, normalised = images(2, seed=9)
    ids, mask = text_inputs()
    with torch.no_grad():
        tokens = vit.forward_features(normalised)
        expected = decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens, is_decoder=True).logits
        hidden = ours.text_decoder(ids, mask, encoder_hidden_states=ours.image_features(pixels)[0], causal=True)
        assert_close(ours.lm_head(hidden)[mask.bool()], expected[mask.bool()])

    key = "text_decoder.bert.encoder.layer.1.intermediate.dense.weight"
    with pytest.raises(ValueError, match=r"text_decoder\.layers\.1\.intermediate\.weight"):
        blip_pretrain_from_lavis({**lavis, key: lavis[key] + 1.0})
    assert "text_decoder.layers.1.intermediate.weight" in blip_pretrain_from_lavis({**lavis, key: lavis[key] + 1.0},
                                                                                  shared=False)


def test_a_lavis_pretraining_checkpoint_starts_a_captioner_at_another_image_size(tmp_path) -> None:
    """BLIP's caption finetune: the pretraining checkpoint (224 px there, 32 px here) initialises the
    captioner at a larger size (384 px there, 48 px here): position embeddings resampled, ITC/ITM parts
    left out, every captioner weight found."""
    vit, encoder, decoder = make_vit(70), make_encoder(71), make_decoder(72)
    _tie_like_lavis(encoder, decoder)
    lavis = {**_blip_itc_itm_state_dict(vit, encoder), **under_prefix("text_decoder.", decoder)}
    del lavis["idx_queue"]
    torch.save({"model": lavis, "config": {"note": "LAVIS keeps more than weights"}}, tmp_path / "pretrain.pth")
    captioner = BlipCaptioner({**VISION, "img_size": 48}, TEXT, bos_token_id=1, eos_token_id=2)
    loaded, report = init_weights(captioner, str(tmp_path / "pretrain.pth"),
                                  "vlforge.models.blip.convert:blip_pretrain_from_lavis")
    assert loaded == len(captioner.state_dict())
    assert {"vision_proj.weight", "itm_head.weight", "logit_scale.log_scale"} <= set(report.unexpected)
    assert captioner.vision.backbone.pos_embed.shape == (1, 1 + 36, VISION_WIDTH)
    reference = BlipPretrain(VISION, TEXT, embed_dim=EMBED, bos_token_id=1, eos_token_id=2)
    load_mapped(reference, blip_pretrain_from_lavis(lavis))
    for name, value in captioner.state_dict().items():
        if "pos_embed" not in name:
            assert torch.equal(value, reference.state_dict()[name]), name
