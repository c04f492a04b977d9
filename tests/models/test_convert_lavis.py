"""LAVIS BLIP / ALBEF checkpoints: every key accounted for, the same outputs as the reference modules.

The LAVIS-style state dicts are built by hand from reference modules with LAVIS's names: a tiny timm
ViT (LAVIS's vit.py is timm's VisionTransformer, LayerNorm eps 1e-6) under `visual_encoder.`, and
transformers' BLIP text models (ported from BLIP's med.py, the file LAVIS uses, with the same
parameter names) under `text_encoder.` / `text_encoder.bert.` / `text_decoder.bert.` and
`*.cls.predictions.`. ALBEF's text encoder has cross-attention only from `fusion_layer` on, so the
reference runs the layers itself (text-only below, cross-attending above) and the checkpoint leaves
out the lower layers' cross-attention keys. Every reference parameter gets random noise, so that
LayerNorms and biases are not at their (easily confused) initial values.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from tests.models.tiny_blip import images
from vlforge.models.albef import ALBEF
from vlforge.models.blip import BlipCaptioner
from vlforge.models.blip_pretrain import BlipPretrain
from vlforge.models.blip_retrieval import BlipRetrieval
from vlforge.models.blip_vqa import BlipVQA
from vlforge.models.convert import load_mapped
from vlforge.models.convert_lavis import (albef_from_lavis, blip_caption_from_lavis, blip_pretrain_from_lavis,
                                          blip_retrieval_from_lavis, blip_vqa_from_lavis, log_scale_from_temperature)

VOCAB, MAXLEN, EMBED, QUEUE, FUSION, TEXT_LAYERS = 64, 40, 16, 8, 2, 4
VISION_WIDTH, TEXT_WIDTH = 32, 48  # different, so a cross-attention built with the wrong width cannot load
VIT = dict(img_size=32, patch_size=8, embed_dim=VISION_WIDTH, depth=2, num_heads=4, mlp_ratio=1.5)
VISION = dict(name="vit_base_patch16_224", **VIT)  # no norm_eps: timm's 1e-6, as LAVIS's ViT
TEXT = dict(vocab_size=VOCAB, width=TEXT_WIDTH, layers=TEXT_LAYERS, heads=4, intermediate=40, max_len=MAXLEN)
TOL = dict(rtol=1e-4, atol=1e-4)


def _noisy(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():  # tied parameters are listed once and stay tied
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return module.eval()


def _vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _noisy(timm.create_model("vit_base_patch16_224", num_classes=0, **VIT), seed)


def _text_config(encoder_width: int, layers: int = TEXT_LAYERS) -> BlipTextConfig:
    # is_decoder only makes transformers build cross-attention in every layer; the forward decides causality.
    return BlipTextConfig(vocab_size=VOCAB, hidden_size=TEXT_WIDTH, encoder_hidden_size=encoder_width,
                          intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4,
                          max_position_embeddings=MAXLEN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          is_decoder=True)


def _encoder(seed: int, encoder_width: int = VISION_WIDTH, layers: int = TEXT_LAYERS) -> BlipTextModel:
    torch.manual_seed(seed)
    return _noisy(BlipTextModel(_text_config(encoder_width, layers), add_pooling_layer=False), seed)


def _decoder(seed: int, encoder_width: int = VISION_WIDTH, layers: int = TEXT_LAYERS) -> BlipTextLMHeadModel:
    torch.manual_seed(seed)
    return _noisy(BlipTextLMHeadModel(_text_config(encoder_width, layers)), seed)


def _linear(fan_in: int, fan_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out).eval()


def _under(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict under `prefix`, plus med.py's saved `position_ids` buffer for BERTs."""
    out = {prefix + k: v.clone() for k, v in module.state_dict().items()}
    for key in list(out):
        if key.endswith("embeddings.word_embeddings.weight"):
            out[key.replace("word_embeddings.weight", "position_ids")] = torch.arange(MAXLEN)[None]
    return out


def _text_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 7, 8, 9, 10, 11, 2], [1, 12, 13, 2, 0, 0, 0]])
    return ids, (ids != 0).long()


def _run_layers(layers, hidden: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """med.py's encoder loop: bidirectional self-attention with its additive mask, cross-attention
    to `image` when given."""
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for layer in layers:
        hidden = layer(hidden, encoder_hidden_states=image, attention_mask=extended)
    return hidden


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, **TOL)


def _apply(state_dict: dict[str, torch.Tensor], linear: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state_dict[f"{linear}.weight"], state_dict[f"{linear}.bias"])


# ---------------------------------------------------------------------------------------------- ALBEF

def _albef_parts(seed: int) -> dict[str, nn.Module]:
    return {"visual_encoder": _vit(seed), "text_encoder": _decoder(seed + 1),
            "vision_proj": _linear(VISION_WIDTH, EMBED, seed + 2), "text_proj": _linear(TEXT_WIDTH, EMBED, seed + 3)}


def _albef_state_dict(parts: dict[str, nn.Module], suffix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        out.update(_under(f"{name}{suffix}.", module))
    # LAVIS's ALBEF builds cross-attention only in layers >= fusion_layer.
    return {k: v for k, v in out.items()
            if not any(f".layer.{i}.crossattention." in k for i in range(FUSION))}


@pytest.fixture(scope="module")
def albef() -> dict:
    online, momentum = _albef_parts(10), _albef_parts(20)
    itm = _linear(TEXT_WIDTH, 2, 30)
    lavis = {**_albef_state_dict(online), **_albef_state_dict(momentum, "_m"), **_under("itm_head.", itm),
             "temp": torch.tensor(0.0537),
             "image_queue": F.normalize(torch.randn(EMBED, QUEUE), dim=0),
             "text_queue": F.normalize(torch.randn(EMBED, QUEUE), dim=0), "queue_ptr": torch.tensor([4])}
    torch.manual_seed(0)
    ours = ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE).eval()
    load_mapped(ours, albef_from_lavis(lavis))
    return {"lavis": lavis, "online": online, "momentum": momentum, "itm": itm, "ours": ours}


def _albef_reference(parts: dict[str, nn.Module], normalised: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    tokens = parts["visual_encoder"].forward_features(normalised)
    image_feat = F.normalize(parts["vision_proj"](tokens[:, 0]), dim=-1)
    bert = parts["text_encoder"].bert
    text = _run_layers(bert.encoder.layer[:FUSION], bert.embeddings(input_ids=ids), mask, None)
    text_feat = F.normalize(parts["text_proj"](text[:, 0]), dim=-1)
    fused = _run_layers(bert.encoder.layer[FUSION:], text, mask, tokens)
    return tokens, image_feat, text, text_feat, fused, parts["text_encoder"].cls(fused)


def _albef_ours(encoders, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    tokens, image_feat = encoders.image(pixels)
    text, text_feat = encoders.text_only(ids, mask)
    fused = encoders.fuse(text, mask, tokens)
    return tokens, image_feat, text, text_feat, fused, encoders.mlm_head(fused)


def albef_max_differences(albef: dict) -> dict[str, float]:
    """Largest |ours - reference| per output, for the online and the momentum encoders."""
    pixels, normalised = images(2, seed=5)
    ids, mask = _text_inputs()
    keep = mask.bool()
    names = ("image_tokens", "image_feat", "text_hidden", "text_feat", "fused_hidden", "mlm_logits")
    out = {}
    with torch.no_grad():
        for label, encoders, parts in (("", albef["ours"].model, albef["online"]),
                                       ("momentum_", albef["ours"].momentum_model, albef["momentum"])):
            for name, got, expected in zip(names, _albef_ours(encoders, pixels, ids, mask),
                                           _albef_reference(parts, normalised, ids, mask)):
                if name in ("text_hidden", "fused_hidden", "mlm_logits"):
                    got, expected = got[keep], expected[keep]  # padded query rows are undefined
                out[label + name] = (got - expected).abs().max().item()
        fused = _albef_reference(albef["online"], normalised, ids, mask)[4]
        out["itm_logits"] = (albef["ours"].itm_head(fused[:, 0]) - albef["itm"](fused[:, 0])).abs().max().item()
    return out


def test_albef_outputs_match_reference_modules(albef) -> None:
    differences = albef_max_differences(albef)
    assert len(differences) == 13
    assert max(differences.values()) < 1e-4, differences


def test_albef_temperature_queues_and_momentum_state(albef) -> None:
    ours, lavis = albef["ours"], albef["lavis"]
    temp = lavis["temp"]
    assert ours.logit_scale.log_scale.shape == (1,)
    assert ours.logit_scale.log_scale.item() == (-torch.log(temp.double())).float().item()
    torch.testing.assert_close(ours.logit_scale().double(), 1.0 / temp.double(), rtol=1e-6, atol=0.0)
    assert torch.equal(ours.image_queue, lavis["image_queue"]) and torch.equal(ours.text_queue, lavis["text_queue"])
    assert ours.queue_ptr.item() == 4 and bool(ours.momentum_ready)  # the momentum weights are kept, not re-copied
    assert torch.equal(ours.momentum_model.text_proj.weight, lavis["text_proj_m.weight"])


def test_temperature_converts_exactly() -> None:
    for value in (0.07, 0.0537, 0.5, 0.001):
        temp = torch.tensor(value)
        log_scale = log_scale_from_temperature(temp)
        assert log_scale.shape == (1,) and log_scale.dtype == torch.float32
        assert log_scale.item() == (-torch.log(temp.double())).float().item()
    with pytest.raises(ValueError, match="positive"):
        log_scale_from_temperature(torch.tensor(0.0))


@pytest.mark.parametrize("key", [
    "text_encoder.bert.encoder.layer.0.attention.self.mystery.weight",
    "visual_encoder.head.weight",
    "text_encoder.cls.predictions.extra",
    "prompt_embeddings",
])
def test_albef_unknown_key_is_named(albef, key: str) -> None:
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        albef_from_lavis({**albef["lavis"], key: torch.zeros(1)})


@pytest.mark.parametrize("key", [
    "temp", "itm_head.bias", "text_proj_m.weight", "image_queue",
    "text_encoder.bert.encoder.layer.1.attention.self.key.bias",
    "text_encoder_m.cls.predictions.transform.LayerNorm.weight",
])
def test_albef_missing_key_is_named(albef, key: str) -> None:
    lavis = {k: v for k, v in albef["lavis"].items() if k != key}
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        albef_from_lavis(lavis)


def test_albef_missing_weight_is_named_by_load_mapped(albef) -> None:
    lavis = {k: v for k, v in albef["lavis"].items() if k != "visual_encoder.blocks.1.norm2.weight"}
    with pytest.raises(KeyError, match=r"missing \['model\.vision\.backbone\.blocks\.1\.norm2\.weight'\]"):
        load_mapped(albef["ours"], albef_from_lavis(lavis))


def test_albef_cross_attention_below_fusion_layer_is_refused(albef) -> None:
    extra = {f"text_encoder.bert.encoder.layer.0.crossattention.{k}": v for k, v in
             albef["online"]["text_encoder"].bert.encoder.layer[0].crossattention.state_dict().items()}
    with pytest.raises(KeyError, match=r"model\.text\.layers\.0\.cross_attention\.query\.weight"):
        load_mapped(albef["ours"], albef_from_lavis({**albef["lavis"], **extra}))


def test_albef_untied_mlm_decoder_is_refused(albef) -> None:
    key = "text_encoder.cls.predictions.decoder.weight"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        albef_from_lavis({**albef["lavis"], key: albef["lavis"][key] + 1.0})


def test_albef_token_type_embeddings_fold_into_positions(albef) -> None:
    """Original ALBEF adds token type 0's embedding to every token: folding it into the position
    embeddings gives what a model that keeps the table computes; "drop" is LAVIS's behaviour."""
    table = torch.randn(2, TEXT_WIDTH, generator=torch.Generator().manual_seed(7))
    lavis = {**albef["lavis"], "text_encoder.bert.embeddings.token_type_embeddings.weight": table,
             "text_encoder_m.bert.embeddings.token_type_embeddings.weight": table}
    kept = ALBEF(VISION, {**TEXT, "type_vocab_size": 2}, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE).eval()
    load_mapped(kept, albef_from_lavis(lavis, token_types="keep"))
    folded = ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE).eval()
    load_mapped(folded, albef_from_lavis(lavis))
    dropped = albef_from_lavis(lavis, token_types="drop")
    ids, mask = _text_inputs()
    with torch.no_grad():
        _assert_close(folded.model.text_only(ids, mask)[0], kept.model.text_only(ids, mask)[0])
    assert torch.equal(dropped["model.text.position_embeddings.weight"],
                       lavis["text_encoder.bert.embeddings.position_embeddings.weight"])


def test_albef_without_momentum_keys_starts_momentum_from_a_copy(albef) -> None:
    lavis = {k: v for k, v in albef["lavis"].items() if "_m." not in k}
    converted = albef_from_lavis(lavis)
    assert not bool(converted["momentum_ready"])
    assert torch.equal(converted["momentum_model.text_proj.weight"], lavis["text_proj.weight"])
    load_mapped(ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE), converted)


def test_albef_queues_can_be_left_out(albef) -> None:
    ours = ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=2 * QUEUE)
    load_mapped(ours, albef_from_lavis(albef["lavis"], queues=False), ignore=("image_queue", "text_queue", "queue_ptr"))
    assert ours.image_queue.shape == (EMBED, 2 * QUEUE)


# ----------------------------------------------------------------------------------------------- BLIP

def _blip_itc_itm_state_dict(vit: nn.Module, encoder: nn.Module) -> dict[str, torch.Tensor]:
    lavis = {**_under("visual_encoder.", vit), **_under("text_encoder.", encoder)}
    for name, (fan_in, fan_out) in {"vision_proj": (VISION_WIDTH, EMBED), "text_proj": (TEXT_WIDTH, EMBED),
                                    "itm_head": (TEXT_WIDTH, 2)}.items():
        lavis.update(_under(f"{name}.", _linear(fan_in, fan_out, len(lavis))))
    # Training state that vlforge's BLIP has no counterpart for (see blip_retrieval_from_lavis).
    for name in ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"):
        lavis.update({k.replace(name[:-2] + ".", name + ".", 1): v + 1.0 for k, v in lavis.items()
                      if k.startswith(name[:-2] + ".")})
    lavis.update(temp=torch.tensor(0.0612), image_queue=torch.randn(EMBED, QUEUE), text_queue=torch.randn(EMBED, QUEUE),
                 idx_queue=torch.full((1, QUEUE), -100), queue_ptr=torch.zeros(1, dtype=torch.long))
    return lavis


@pytest.fixture(scope="module")
def retrieval() -> dict:
    vit, encoder = _vit(40), _encoder(41)
    lavis = _blip_itc_itm_state_dict(vit, encoder)
    ours = BlipRetrieval(VISION, TEXT, embed_dim=EMBED).eval()
    load_mapped(ours, blip_retrieval_from_lavis(lavis))
    return {"lavis": lavis, "vit": vit, "encoder": encoder, "ours": ours}


def test_blip_retrieval_matches_reference_modules(retrieval) -> None:
    ours, lavis = retrieval["ours"], retrieval["lavis"]
    pixels, normalised = images(2, seed=6)
    ids, mask = _text_inputs()
    keep = mask.bool()
    with torch.no_grad():
        tokens = retrieval["vit"].forward_features(normalised)
        got_tokens, got_image = ours.image_features(pixels)
        _assert_close(got_tokens, tokens)
        _assert_close(got_image, F.normalize(_apply(lavis, "vision_proj", tokens[:, 0]), dim=-1))
        text = retrieval["encoder"](input_ids=ids, attention_mask=mask).last_hidden_state
        _assert_close(ours.text_encoder(ids, mask)[keep], text[keep])
        _assert_close(ours.encode_text(ids, mask), F.normalize(_apply(lavis, "text_proj", text[:, 0]), dim=-1))
        fused = retrieval["encoder"](input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens).last_hidden_state
        _assert_close(ours.itm_logits(tokens, ids, mask), _apply(lavis, "itm_head", fused[:, 0]))
    assert ours.logit_scale.log_scale.item() == (-torch.log(lavis["temp"].double())).float().item()


@pytest.mark.parametrize("key", ["text_encoder_mm.embeddings.word_embeddings.weight", "visual_encoder.fc_norm.weight"])
def test_blip_retrieval_unknown_key_is_named(retrieval, key: str) -> None:
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        blip_retrieval_from_lavis({**retrieval["lavis"], key: torch.zeros(1)})


@pytest.mark.parametrize("key", ["temp", "vision_proj.bias",
                                 "text_encoder.encoder.layer.0.crossattention.self.value.weight"])
def test_blip_retrieval_missing_key_is_named(retrieval, key: str) -> None:
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        blip_retrieval_from_lavis({k: v for k, v in retrieval["lavis"].items() if k != key})


def test_blip_caption_matches_reference_modules() -> None:
    vit, decoder = _vit(50), _decoder(51)
    lavis = {**_under("visual_encoder.", vit), **_under("text_decoder.", decoder)}
    ours = BlipCaptioner(VISION, TEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0, prompt_length=1).eval()
    load_mapped(ours, blip_caption_from_lavis(lavis))
    pixels, normalised = images(2, seed=7)
    ids, mask = _text_inputs()
    with torch.no_grad():
        tokens = vit.forward_features(normalised)
        _assert_close(ours.image_tokens(pixels), tokens)
        expected = decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens, is_decoder=True).logits
        _assert_close(ours.logits(tokens, ids, mask)[mask.bool()], expected[mask.bool()])


def test_blip_vqa_matches_reference_modules() -> None:
    vit, encoder, decoder = _vit(60), _encoder(61), _decoder(62, encoder_width=TEXT_WIDTH)
    lavis = {**_under("visual_encoder.", vit), **_under("text_encoder.", encoder), **_under("text_decoder.", decoder)}
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
        _assert_close(got_question[q_mask.bool()], question[q_mask.bool()])
        expected = decoder(input_ids=a_ids, attention_mask=a_mask, encoder_hidden_states=question,
                           encoder_attention_mask=q_mask, is_decoder=True).logits
        got = ours.answer_logits(got_question, q_mask, a_ids, a_mask)
        _assert_close(got[a_mask.bool()], expected[a_mask.bool()])


def _tie_like_lavis(encoder: BlipTextModel, decoder: BlipTextLMHeadModel) -> None:
    """LAVIS's tie_encoder_decoder_weights(encoder, decoder.bert, skip "/attention"): the decoder
    uses the encoder's embeddings, cross-attention and feed-forward; only self-attention differs."""
    with torch.no_grad():
        params = dict(decoder.bert.named_parameters())
        for name, value in encoder.named_parameters():
            if ".attention." not in name:
                params[name].copy_(value)


def test_blip_pretrain_loads_shared_weights_once_and_matches() -> None:
    vit, encoder, decoder = _vit(70), _encoder(71), _decoder(72)
    _tie_like_lavis(encoder, decoder)
    lavis = {**_blip_itc_itm_state_dict(vit, encoder), **_under("text_decoder.", decoder)}
    del lavis["idx_queue"]  # LAVIS's pretraining model has no id queue
    ours = BlipPretrain(VISION, TEXT, embed_dim=EMBED, bos_token_id=1, eos_token_id=2).eval()
    load_mapped(ours, blip_pretrain_from_lavis(lavis))
    pixels, normalised = images(2, seed=9)
    ids, mask = _text_inputs()
    with torch.no_grad():
        tokens = vit.forward_features(normalised)
        expected = decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=tokens, is_decoder=True).logits
        hidden = ours.text_decoder(ids, mask, encoder_hidden_states=ours.image_features(pixels)[0], causal=True)
        _assert_close(ours.lm_head(hidden)[mask.bool()], expected[mask.bool()])

    key = "text_decoder.bert.encoder.layer.1.intermediate.dense.weight"
    with pytest.raises(ValueError, match=r"text_decoder\.layers\.1\.intermediate\.weight"):
        blip_pretrain_from_lavis({**lavis, key: lavis[key] + 1.0})
    assert "text_decoder.layers.1.intermediate.weight" in blip_pretrain_from_lavis({**lavis, key: lavis[key] + 1.0},
                                                                                  shared=False)


def test_a_lavis_pretraining_checkpoint_starts_a_captioner_at_another_image_size(tmp_path) -> None:
    """BLIP's caption finetune: the pretraining checkpoint (224 px there, 32 px here) initialises the
    captioner at a larger size (384 px there, 48 px here): position embeddings resampled, ITC/ITM parts
    left out, every captioner weight found."""
    from vlforge.models.blip import BlipCaptioner
    from vlforge.trainer.weights import init_weights

    vit, encoder, decoder = _vit(70), _encoder(71), _decoder(72)
    _tie_like_lavis(encoder, decoder)
    lavis = {**_blip_itc_itm_state_dict(vit, encoder), **_under("text_decoder.", decoder)}
    del lavis["idx_queue"]
    torch.save({"model": lavis, "config": {"note": "LAVIS keeps more than weights"}}, tmp_path / "pretrain.pth")
    captioner = BlipCaptioner({**VISION, "img_size": 48}, TEXT, bos_token_id=1, eos_token_id=2)
    loaded, left_out = init_weights(captioner, str(tmp_path / "pretrain.pth"),
                                    "vlforge.models.convert_lavis:blip_pretrain_from_lavis")
    assert loaded == len(captioner.state_dict())
    assert {"vision_proj.weight", "itm_head.weight", "logit_scale.log_scale"} <= set(left_out)
    assert captioner.vision.backbone.pos_embed.shape == (1, 1 + 36, VISION_WIDTH)
    reference = BlipPretrain(VISION, TEXT, embed_dim=EMBED, bos_token_id=1, eos_token_id=2)
    load_mapped(reference, blip_pretrain_from_lavis(lavis))
    for name, value in captioner.state_dict().items():
        if "pos_embed" not in name:
            assert torch.equal(value, reference.state_dict()[name]), name
