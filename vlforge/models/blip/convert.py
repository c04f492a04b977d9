"""BLIP checkpoints -> vlforge state dicts, by key mapping (no code of theirs runs): transformers'
BLIP (`*_from_hf`) and LAVIS's `.pth` files (`*_from_lavis`). Every key is mapped, ignored for a
reason written beside it, or named in a KeyError."""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from vlforge.models.layers.convert import bert_from_hf, bert_lm_head_from_hf, rename_key
from vlforge.models.layers.lavis import (
    LavisCheckpoint,
    check_all_mapped,
    lavis_linear,
    lavis_lm_head,
    lavis_text,
    lavis_vision,
    log_scale_from_temperature,
    prefixed,
)

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
        renamed = rename_key(full_key[len(prefix):], _VIT_RENAMES)
        if renamed is None:
            raise KeyError(f"no vlforge name for BLIP vision checkpoint key '{full_key}'")
        out[renamed] = value
    return out


_DECODER_WORDS = "text_decoder.bert.embeddings.word_embeddings.weight"


def blip_caption_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BlipForConditionalGeneration -> vlforge.models.blip.caption.BlipCaptioner."""
    out = {f"vision.{k}": v for k, v in blip_vision_from_hf(state_dict).items()}
    out.update({f"text_decoder.{k}": v for k, v in bert_from_hf(state_dict, "text_decoder.bert.").items()})
    out.update({f"lm_head.{k}": v for k, v in bert_lm_head_from_hf(state_dict, "text_decoder.cls.predictions.",
                                                                               _DECODER_WORDS).items()})
    return out


def blip_retrieval_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BlipForImageTextRetrieval -> vlforge.models.blip.retrieval.BlipRetrieval.

    HF keeps no temperature in this model; load with `ignore=("logit_scale",)`.
    """
    out = {f"vision.{k}": v for k, v in blip_vision_from_hf(state_dict).items()}
    out.update({f"text_encoder.{k}": v for k, v in bert_from_hf(state_dict, "text_encoder.").items()})
    out.update({k: v for k, v in state_dict.items() if k.split(".")[0] in ("vision_proj", "text_proj", "itm_head")})
    return out


def blip_vqa_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BlipForQuestionAnswering -> vlforge.models.blip.vqa.BlipVQA."""
    out = {f"vision.{k}": v for k, v in blip_vision_from_hf(state_dict).items()}
    out.update({f"text_encoder.{k}": v for k, v in bert_from_hf(state_dict, "text_encoder.").items()})
    out.update({f"text_decoder.{k}": v for k, v in bert_from_hf(state_dict, "text_decoder.bert.").items()})
    out.update({f"lm_head.{k}": v for k, v in bert_lm_head_from_hf(state_dict, "text_decoder.cls.predictions.",
                                                                               _DECODER_WORDS).items()})
    return out


# Momentum encoders and feature queues of LAVIS's BLIP retrieval/pretraining models.
_BLIP_MOMENTUM = ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m")

# LAVIS names the queue pointer `queue_ptr`; BLIP's own checkpoints, which LAVIS also loads, `ptr_queue`.
FEATURE_QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue")


def blip_caption_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip_caption` -> vlforge.models.blip.caption.BlipCaptioner."""
    ckpt = LavisCheckpoint(state_dict)
    out = prefixed("vision.", lavis_vision(ckpt))
    out.update(prefixed("text_decoder.", lavis_text(ckpt, "text_decoder.bert.")))
    out.update(prefixed("lm_head.", lavis_lm_head(ckpt, "text_decoder.cls.predictions.",
                                              "text_decoder.bert.embeddings.word_embeddings.weight")))
    return check_all_mapped(ckpt, out)


def _blip_itc_itm(ckpt: LavisCheckpoint, heads: tuple[str, ...] = ("vision_proj", "text_proj", "itm_head"),
                  ) -> dict[str, torch.Tensor]:
    """The parts vlforge's BlipRetrieval has: image tower, text encoder, ITC projections and
    temperature, ITM head (those of `heads` the checkpoint has)."""
    out = prefixed("vision.", lavis_vision(ckpt))
    out.update(prefixed("text_encoder.", lavis_text(ckpt, "text_encoder.")))
    for name in heads:
        out.update(prefixed(f"{name}.", lavis_linear(ckpt, name)))
    if "temp" in ckpt.state_dict:  # LAVIS's BlipITM has no temperature: its ITC score is the cosine
        out["logit_scale.log_scale"] = log_scale_from_temperature(ckpt.get("temp"))
    # vlforge's BLIP computes ITC exactly over the global batch (features gathered from all ranks),
    # with no momentum distillation: LAVIS's momentum encoders and feature/id queues are training state
    # of a method vlforge does not run, and nothing in vlforge's BLIP would read them.
    ckpt.ignore(_BLIP_MOMENTUM)
    ckpt.ignore(FEATURE_QUEUES)
    return out


def blip_retrieval_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip_retrieval` (or `blip_image_text_matching`) -> vlforge.models.blip.retrieval.BlipRetrieval.

    LAVIS replaces [CLS] with [ENC] for ITM: build the model with `enc_token_id` set to that id.
    """
    ckpt = LavisCheckpoint(state_dict)
    return check_all_mapped(ckpt, _blip_itc_itm(ckpt))


def blip_feature_extractor_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip_feature_extractor` -> vlforge.models.blip.retrieval.BlipRetrieval without an ITM
    head (load with `ignore=("itm_head.weight", "itm_head.bias")`).

    LAVIS builds its feature extractor from BLIP's pretraining checkpoint and loads it non-strictly,
    so the decoder, ITM head, momentum encoders and queues that file holds are unused: ignored here."""
    ckpt = LavisCheckpoint(state_dict)
    ckpt.ignore(("text_decoder", "itm_head", *_BLIP_MOMENTUM, *FEATURE_QUEUES))
    return check_all_mapped(ckpt, _blip_itc_itm(ckpt, heads=("vision_proj", "text_proj")))


def _check_shared(out: Mapping[str, torch.Tensor]) -> None:
    """BlipPretrain shares every decoder weight but self-attention with the encoder, as LAVIS ties
    them; values that differ would be loaded into one tensor, the last one silently winning."""
    for key, value in out.items():
        if not key.startswith("text_decoder.") or re.match(r"text_decoder\.layers\.\d+\.attention\.", key):
            continue
        twin = "text_encoder." + key[len("text_decoder."):]
        if twin in out and not torch.equal(value, out[twin]):
            raise ValueError(f"LAVIS decoder weight for '{key}' differs from the encoder's '{twin}', which "
                             "BlipPretrain(share_weights=True) shares; convert with shared=False")


def blip_pretrain_from_lavis(state_dict: Mapping[str, torch.Tensor], shared: bool = True) -> dict[str, torch.Tensor]:
    """LAVIS `blip_pretrain` -> vlforge.models.blip.pretrain.BlipPretrain.

    `shared` mirrors BlipPretrain's `share_weights`; when true, the decoder's copies of shared weights
    must equal the encoder's (LAVIS ties them, so its checkpoints hold equal copies).
    """
    ckpt = LavisCheckpoint(state_dict)
    out = _blip_itc_itm(ckpt)
    out.update(prefixed("text_decoder.", lavis_text(ckpt, "text_decoder.bert.")))
    out.update(prefixed("lm_head.", lavis_lm_head(ckpt, "text_decoder.cls.predictions.",
                                              "text_decoder.bert.embeddings.word_embeddings.weight")))
    if shared:
        _check_shared(out)
    return check_all_mapped(ckpt, out)


def blip_vqa_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip_vqa` -> vlforge.models.blip.vqa.BlipVQA."""
    ckpt = LavisCheckpoint(state_dict)
    out = prefixed("vision.", lavis_vision(ckpt))
    out.update(prefixed("text_encoder.", lavis_text(ckpt, "text_encoder.")))
    out.update(prefixed("text_decoder.", lavis_text(ckpt, "text_decoder.bert.")))
    out.update(prefixed("lm_head.", lavis_lm_head(ckpt, "text_decoder.cls.predictions.",
                                              "text_decoder.bert.embeddings.word_embeddings.weight")))
    return check_all_mapped(ckpt, out)


def blip_dimensions(hf_config: Any, target: str) -> dict[str, Any]:
    """Model-node values of an HF BLIP checkpoint's config (BlipConfig): the ViT and BERT dimensions,
    the special token ids and (retrieval) the ITC width. The converters map the weights themselves."""
    vision, text = hf_config.vision_config, hf_config.text_config
    node: dict[str, Any] = {
        "vision": {"name": "vit_base_patch16_224", "img_size": vision.image_size, "patch_size": vision.patch_size,
                   "embed_dim": vision.hidden_size, "depth": vision.num_hidden_layers,
                   "num_heads": vision.num_attention_heads, "mlp_ratio": vision.intermediate_size / vision.hidden_size,
                   "norm_eps": vision.layer_norm_eps},
        "text": {"vocab_size": text.vocab_size, "width": text.hidden_size, "layers": text.num_hidden_layers,
                 "heads": text.num_attention_heads, "intermediate": text.intermediate_size,
                 "max_len": text.max_position_embeddings},
    }
    if target.endswith("BlipRetrieval"):
        node["embed_dim"] = hf_config.image_text_hidden_size
    else:  # the captioner and VQA decoders: HF BLIP starts decoding at bos ([DEC]) and stops at [SEP]
        node.update(bos_token_id=text.bos_token_id, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)
    return node
