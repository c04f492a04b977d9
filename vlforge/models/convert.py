"""Checkpoints of other libraries -> vlforge state dicts, by key mapping (no code of theirs runs).

Each converter takes a state dict and returns one whose keys are the vlforge module's; `load_mapped`
loads it strictly, so a key that maps nowhere is an error that names it, never a silent skip.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import nn

# HF BERT / BLIP-text / LAVIS med.py names -> vlforge.models.bert names (after the prefix is removed).
_BERT_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.word_embeddings\.", "word_embeddings."),
    (r"^embeddings\.position_embeddings\.", "position_embeddings."),
    (r"^embeddings\.token_type_embeddings\.", "token_type_embeddings."),
    (r"^embeddings\.LayerNorm\.", "embed_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.dense."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.self\.query\.", r"layers.\1.cross_attention.query."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attention.dense."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.norm."),
]
# Separate projections that vlforge fuses: (pattern of the parts, target, order of the parts).
_BERT_FUSED: list[tuple[str, str, tuple[str, ...]]] = [
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$",
     r"layers.{0}.attention.query_key_value.{2}", ("query", "key", "value")),
    (r"^encoder\.layer\.(\d+)\.crossattention\.self\.(key|value)\.(weight|bias)$",
     r"layers.{0}.cross_attention.key_value.{2}", ("key", "value")),
]
_BERT_IGNORED = (r"^embeddings\.position_ids$", r"^pooler\.")


def _rename(key: str, renames: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in renames:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def _map_keys(state_dict: Mapping[str, torch.Tensor], prefix: str, renames: list[tuple[str, str]],
              fused_groups: list[tuple[str, str, tuple[str, ...]]], ignored: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """The keys under `prefix`, renamed (`renames`), joined where vlforge fuses separate projections
    (`fused_groups`: pattern with groups (layer, part, kind), target, order of the parts) or left out
    (`ignored` patterns); any other key is a KeyError naming it."""
    out: dict[str, torch.Tensor] = {}
    # target -> (order of the parts, the parts found, one checkpoint key and its part, to name what is missing)
    fused: dict[str, tuple[tuple[str, ...], dict[str, torch.Tensor], str, str]] = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if any(re.search(p, key) for p in ignored):
            continue
        for pattern, target, order in fused_groups:
            match = re.match(pattern, key)
            if match:
                layer, part, kind = match.groups()
                fused.setdefault(target.format(layer, part, kind), (order, {}, full_key, part))[1][part] = value
                break
        else:
            renamed = _rename(key, renames)
            if renamed is None:
                raise KeyError(f"no vlforge name for {what} checkpoint key '{full_key}'")
            out[renamed] = value
    for target, (order, parts, seen_key, seen_part) in fused.items():
        head, _, tail = seen_key.rpartition(f".{seen_part}.")
        missing = [f"{head}.{p}.{tail}" for p in order if p not in parts]
        if missing:
            raise KeyError(f"checkpoint lacks {missing}, parts of the fused '{target}'")
        out[target] = torch.cat([parts[p] for p in order], dim=0)
    return out


def bert_from_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """An HF BertModel / BlipTextModel (or LAVIS BLIP/ALBEF text encoder) state dict, under `prefix`,
    as a `vlforge.models.bert.BertTextModel` state dict. Keys outside `prefix` are left out."""
    return _map_keys(state_dict, prefix, _BERT_RENAMES, _BERT_FUSED, _BERT_IGNORED, "BERT")


_VIT_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.class_embedding$", "backbone.cls_token"),
    (r"^embeddings\.position_embedding$", "backbone.pos_embed"),
    (r"^embeddings\.patch_embedding\.", "backbone.patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"backbone.blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"backbone.blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"backbone.blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"backbone.blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"backbone.blocks.\1.mlp.fc\2."),
    (r"^post_layernorm\.", "backbone.norm."),
]


def blip_vision_from_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """transformers' BlipVisionModel (a pre-norm ViT) -> a TimmVisionTower over timm's VisionTransformer."""
    out: dict[str, torch.Tensor] = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        renamed = _rename(full_key[len(prefix):], _VIT_RENAMES)
        if renamed is None:
            raise KeyError(f"no vlforge name for BLIP vision checkpoint key '{full_key}'")
        out[renamed] = value
    return out


def bert_lm_head_from_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = "cls.predictions.",
                         tied_embedding_key: str | None = None) -> dict[str, torch.Tensor]:
    """BERT's `cls.predictions.*` -> BertLMHead (the tied decoder weight is copied, not shared).
    `save_pretrained` leaves the tied decoder weight out of the file: it is then the word embeddings
    under `tied_embedding_key`."""
    names = {"transform.dense.weight": "dense.weight", "transform.dense.bias": "dense.bias",
             "transform.LayerNorm.weight": "norm.weight", "transform.LayerNorm.bias": "norm.bias",
             "decoder.weight": "decoder.weight", "bias": "decoder.bias"}
    if prefix + "decoder.weight" not in state_dict and tied_embedding_key in state_dict:
        state_dict = {**state_dict, prefix + "decoder.weight": state_dict[tied_embedding_key]}
    missing = [prefix + theirs for theirs in names if prefix + theirs not in state_dict]
    if missing:
        raise KeyError(f"checkpoint lacks LM head keys {missing}")
    out = {ours: state_dict[prefix + theirs] for theirs, ours in names.items()}
    return out


_DECODER_WORDS = "text_decoder.bert.embeddings.word_embeddings.weight"


def blip_caption_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BlipForConditionalGeneration -> vlforge.models.blip.BlipCaptioner."""
    out = {f"vision.{k}": v for k, v in blip_vision_from_hf(state_dict).items()}
    out.update({f"text_decoder.{k}": v for k, v in bert_from_hf(state_dict, "text_decoder.bert.").items()})
    out.update({f"lm_head.{k}": v for k, v in bert_lm_head_from_hf(state_dict, "text_decoder.cls.predictions.",
                                                                               _DECODER_WORDS).items()})
    return out


def blip_retrieval_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BlipForImageTextRetrieval -> vlforge.models.blip_retrieval.BlipRetrieval.

    HF keeps no temperature in this model; load with `ignore=("logit_scale",)`.
    """
    out = {f"vision.{k}": v for k, v in blip_vision_from_hf(state_dict).items()}
    out.update({f"text_encoder.{k}": v for k, v in bert_from_hf(state_dict, "text_encoder.").items()})
    out.update({k: v for k, v in state_dict.items() if k.split(".")[0] in ("vision_proj", "text_proj", "itm_head")})
    return out


def blip_vqa_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BlipForQuestionAnswering -> vlforge.models.blip_vqa.BlipVQA."""
    out = {f"vision.{k}": v for k, v in blip_vision_from_hf(state_dict).items()}
    out.update({f"text_encoder.{k}": v for k, v in bert_from_hf(state_dict, "text_encoder.").items()})
    out.update({f"text_decoder.{k}": v for k, v in bert_from_hf(state_dict, "text_decoder.bert.").items()})
    out.update({f"lm_head.{k}": v for k, v in bert_lm_head_from_hf(state_dict, "text_decoder.cls.predictions.",
                                                                               _DECODER_WORDS).items()})
    return out


# transformers' Blip2QFormerModel names -> vlforge.models.qformer.QFormer names.
_QFORMER_RENAMES: list[tuple[str, str]] = [
    (r"^layernorm\.", "embed_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.dense."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.attention\.query\.", r"layers.\1.cross_attention.query."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attention.dense."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"layers.\1.query_ffn.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output_query\.dense\.", r"layers.\1.query_ffn.output."),
    (r"^encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"layers.\1.query_ffn.norm."),
]
_QFORMER_FUSED: list[tuple[str, str, tuple[str, ...]]] = [
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$",
     r"layers.{0}.attention.query_key_value.{2}", ("query", "key", "value")),
    (r"^encoder\.layer\.(\d+)\.crossattention\.attention\.(key|value)\.(weight|bias)$",
     r"layers.{0}.cross_attention.key_value.{2}", ("key", "value")),
]
# The text feed-forward, which checkpoints saved by older transformers carry; stage 2 feeds the
# Q-Former no text, so BLIP-2's LM models never use it (vlforge's stage-2 Q-Former has none).
_QFORMER_TEXT_FFN = (r"^encoder\.layer\.\d+\.(intermediate|output)\.",)


def blip2_causal_lm_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Blip2ForConditionalGeneration with a decoder-only LM (OPT) ->
    vlforge.models.blip2_lm.Blip2CausalLM.

    HF's `vision_model.post_layernorm` is BLIP-2's LayerNorm on the tower's output (LAVIS's ln_vision),
    vlforge's `encoder.vision_norm`; the tower itself ends without a norm. The LM's keys keep their
    names under `language_model.`; a tied LM head, which `save_pretrained` leaves out, is the word
    embeddings once loaded (load with `ignore=("language_model.lm_head.weight",)`)."""
    tower = {k: v for k, v in state_dict.items() if not k.startswith("vision_model.post_layernorm.")}
    out = {f"encoder.vision.{k}": v for k, v in blip_vision_from_hf(tower).items()}
    for kind in ("weight", "bias"):
        out[f"encoder.vision_norm.{kind}"] = state_dict[f"vision_model.post_layernorm.{kind}"]
    qformer = _map_keys(state_dict, "qformer.", _QFORMER_RENAMES, _QFORMER_FUSED, _QFORMER_TEXT_FFN, "BLIP-2 Q-Former")
    out.update({f"encoder.qformer.{k}": v for k, v in qformer.items()})
    out["encoder.qformer.query_tokens"] = state_dict["query_tokens"]
    known = ("vision_model.", "qformer.", "query_tokens", "language_projection.", "language_model.")
    unknown = [k for k in state_dict if not k.startswith(known)]
    if unknown:
        raise KeyError(f"no vlforge name for BLIP-2 checkpoint keys {unknown[:10]} ({len(unknown)})")
    out.update({k: v for k, v in state_dict.items() if k.startswith(("language_projection.", "language_model."))})
    return out


_OPEN_CLIP_BLOCK = [
    (r"ln_1\.", "norm1."),
    (r"attn\.in_proj_weight$", "attn.qkv.weight"),
    (r"attn\.in_proj_bias$", "attn.qkv.bias"),
    (r"attn\.out_proj\.", "attn.proj."),
    (r"ln_2\.", "norm2."),
]


def _same(value: torch.Tensor) -> torch.Tensor:
    return value


_OPEN_CLIP_SIMPLE = {
    "token_embedding.weight": ("text.token_embedding.weight", _same),
    "positional_embedding": ("text.position_embedding.weight", _same),
    "ln_final.weight": ("text.norm.weight", _same),
    "ln_final.bias": ("text.norm.bias", _same),
    "text_projection": ("text_proj.weight", lambda v: v.t()),
    "logit_scale": ("logit_scale.log_scale", lambda v: v.reshape(1)),
    "visual.class_embedding": ("vision.backbone.cls_token", lambda v: v.reshape(1, 1, -1)),
    "visual.positional_embedding": ("vision.backbone.pos_embed", lambda v: v.unsqueeze(0)),
    "visual.conv1.weight": ("vision.backbone.patch_embed.proj.weight", _same),
    "visual.ln_pre.weight": ("vision.backbone.norm_pre.weight", _same),
    "visual.ln_pre.bias": ("vision.backbone.norm_pre.bias", _same),
    "visual.ln_post.weight": ("vision.backbone.norm.weight", _same),
    "visual.ln_post.bias": ("vision.backbone.norm.bias", _same),
    "visual.proj": ("vision_proj.weight", lambda v: v.t()),
}


def clip_from_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict -> vlforge.models.clip.CLIP (timm ViT image tower, `pool: last`
    causal text tower). Projections stored as matrices (x @ P) become Linear weights (P transposed)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in ("attn_mask",) or key.endswith(".attn_mask"):
            continue
        match = re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.*)$", key)
        if match:
            visual, layer, rest = match.groups()
            if rest.startswith("mlp.c_fc."):
                rest = ("mlp.fc1." if visual else "mlp.0.") + rest[len("mlp.c_fc."):]
            elif rest.startswith("mlp.c_proj."):
                rest = ("mlp.fc2." if visual else "mlp.2.") + rest[len("mlp.c_proj."):]
            else:
                renamed = _rename(rest, _OPEN_CLIP_BLOCK)
                if renamed is None:
                    raise KeyError(f"no vlforge name for open_clip key '{key}'")
                rest = renamed
            out[f"vision.backbone.blocks.{layer}.{rest}" if visual else f"text.blocks.{layer}.{rest}"] = value
            continue
        if key not in _OPEN_CLIP_SIMPLE:
            raise KeyError(f"no vlforge name for open_clip key '{key}'")
        name, reshape = _OPEN_CLIP_SIMPLE[key]
        out[name] = reshape(value)
    return out


def albef_towers_from_dual_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vlforge dual encoder's (CLIP's, BLIP retrieval's) image tower -> ALBEF's two copies of it,
    `model.vision` and `momentum_model.vision` (`trainer.init_converter` with `init_partial`: the
    text side starts fresh). Both copies, because the momentum model's running statistics are
    buffers, which the first momentum update (parameters only) does not copy."""
    tower = {key.removeprefix("vision."): value for key, value in state_dict.items() if key.startswith("vision.")}
    if not tower:
        raise KeyError("albef_towers_from_dual_encoder: the checkpoint has no 'vision.' weights")
    return {f"{copy}.vision.{key}": value for copy in ("model", "momentum_model") for key, value in tower.items()}


def load_mapped(module: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore: Iterable[str] = ()) -> None:
    """Strict load that names every missing or unexpected key (and shape mismatches)."""
    ignore = tuple(ignore)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.startswith(ignore)]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise KeyError(f"checkpoint does not fit {type(module).__name__}: missing {missing}, "
                       f"unexpected {unexpected}, shape mismatches {shapes}")
    module.load_state_dict(state_dict, strict=not ignore)
