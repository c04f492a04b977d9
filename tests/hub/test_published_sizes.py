"""The base and large YAMLs build the published architectures: parameter counts equal to HF's
(ALBEF: of LAVIS's, counted from the published parts LAVIS builds it of)."""
from __future__ import annotations

import inspect

import pytest
import timm
import torch
import yaml
from hydra.utils import get_class, instantiate
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipVisionConfig,
    OPTConfig,
)

from vlforge.config.recipes import RECIPES_DIR


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters count once


def _build(name: str) -> torch.nn.Module:
    node = yaml.safe_load((RECIPES_DIR / "model" / f"{name}.yaml").read_text())
    if "tokenizer" in node:
        node["tokenizer"] = None  # the size does not depend on it; a decoder's ids are given instead
        if "bos_token_id" in inspect.signature(get_class(node["_target_"])).parameters:
            node.update(bos_token_id=30522, eos_token_id=102)
    return instantiate(node, _convert_="all")


@pytest.mark.parametrize("name, vision_width, vision_layers, vision_heads", [
    ("blip_caption_base", 768, 12, 12),
    ("blip_caption_large", 1024, 24, 16),
])
def test_blip_caption_matches_hf_size(name: str, vision_width: int, vision_layers: int, vision_heads: int) -> None:
    vision = BlipVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=384)
    config = BlipConfig(vision_config=vision.to_dict(), text_config={"encoder_hidden_size": vision_width})
    with torch.device("meta"):
        reference = _count(BlipForConditionalGeneration(config))
        ours = _count(_build(name))
    assert ours == reference, (ours, reference)


def test_blip_retrieval_matches_hf_size() -> None:
    with torch.device("meta"):
        reference = _count(BlipForImageTextRetrieval(BlipConfig()))
        ours = _count(_build("blip_retrieval_base"))
    # vlforge adds the ITC temperature (1 parameter) that HF's retrieval model does not keep.
    assert ours == reference + 1, (ours, reference)


def test_blip_vqa_matches_hf_size() -> None:
    with torch.device("meta"):
        reference = _count(BlipForQuestionAnswering(BlipConfig()))
        ours = _count(_build("blip_vqa_base"))
    assert ours == reference, (ours, reference)


def _albef_base_reference() -> tuple[int, int]:
    """(trainable, total) parameters of LAVIS's `albef_pretrain` base, from the published parts it is
    built of (lavis/models/albef_models/albef_pretrain.py, med.py, vit.py, med_config_albef.json):

    - visual_encoder: LAVIS's ViT-B/16 at 224 px, timm's `vit_base_patch16_224` without its head;
    - text_encoder: med.py's BertForMaskedLM from bert-base-uncased with fusion_layer 6: BERT-base and
      its MLM head (output projection tied to the word embeddings, own bias), no pooler, no token type
      embeddings (`add_type_embeddings: false`), and cross-attention only in layers 6-11 (med.py's
      BertLayer adds it when layer_num >= fusion_layer). Counted as transformers' BertForMaskedLM with
      cross-attention in all 12 layers, minus that of layers 0-5 and minus the token type table;
    - vision_proj and text_proj 768 -> 256, itm_head 768 -> 2, the temperature `temp` (1);
    - the momentum copies visual_encoder_m, text_encoder_m, vision_proj_m, text_proj_m: not trained.
    """
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", num_classes=0)
        bert = BertForMaskedLM(BertConfig(add_cross_attention=True, is_decoder=True))
    text = _count(bert) - bert.bert.embeddings.token_type_embeddings.weight.numel()
    text -= sum(_count(layer.crossattention) for layer in bert.bert.encoder.layer[:6])
    projections = 2 * (768 * 256 + 256)
    momentum_copied = _count(vit) + text + projections
    trainable = momentum_copied + (768 * 2 + 2) + 1
    return trainable, trainable + momentum_copied


def test_albef_base_matches_lavis_size() -> None:
    reference_trainable, reference_total = _albef_base_reference()
    with torch.device("meta"):
        model = _build("albef_base")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == reference_trainable, (trainable, reference_trainable)
    assert _count(model) == reference_total, (_count(model), reference_total)


def test_blip2_opt_matches_hf_size() -> None:
    """HF's Blip2ForConditionalGeneration with OPT-2.7b (Salesforce/blip2-opt-2.7b's config) against
    blip2_opt2.7b.yaml, its LM built from the same OPT config instead of downloaded."""
    opt = dict(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
               max_position_embeddings=2048, word_embed_proj_dim=2560)
    node = yaml.safe_load((RECIPES_DIR / "model" / "blip2_opt2.7b.yaml").read_text())
    node.update(tokenizer=None, language_model={"config": {"model_type": "opt", **opt}})
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(Blip2Config(text_config=OPTConfig(**opt).to_dict()))
        model = instantiate(node, _convert_="all")
    reference, ours = _count(hf), _count(model)
    assert ours == reference, (ours, reference)
    # Stage 2 trains the queries, the Q-Former, the projection and the tower's output LayerNorm
    # (HF's post_layernorm, LAVIS's ln_vision); the tower and the LM stay frozen.
    reference_trainable = (hf.query_tokens.numel() + _count(hf.qformer) + _count(hf.language_projection)
                           + _count(hf.vision_model.post_layernorm))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == reference_trainable, (trainable, reference_trainable)


@pytest.mark.parametrize("name, open_clip_name", [("clip_vit_b32", "ViT-B-32"), ("clip_vit_b16", "ViT-B-16"),
                                                 ("clip_vit_l14", "ViT-L-14")])
def test_clip_matches_open_clip_size(name: str, open_clip_name: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        reference = _count(open_clip.create_model(open_clip_name, pretrained=None, device="meta"))
        ours = _count(_build(name))
    assert ours == reference, (ours, reference)
