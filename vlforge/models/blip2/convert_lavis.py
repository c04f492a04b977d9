"""LAVIS's BLIP-2 checkpoints -> vlforge state dicts, by key mapping (no code of theirs runs).

Layout, as LAVIS builds it (lavis/models/blip2_models/blip2.py, Qformer.py, eva_vit.py):
- `visual_encoder.*`: EVA ViT-g (timm's names, but the qkv projection's bias is kept as `attn.q_bias`
  and `attn.v_bias`, the key's bias being zero), no final norm; `ln_vision.*` the LayerNorm on its output.
- `Qformer.bert.*`: a med.py-style BERT with `crossattention` every `cross_attention_freq` layers and
  a second feed-forward for the queries (`intermediate_query`, `output_query`); `Qformer.cls.*` the
  stage-1 LM head; `query_tokens`.
- stage 1: `vision_proj`, `text_proj`, `itm_head`, `temp`.

LAVIS saves only the weights that train: a checkpoint of a run with the image tower frozen (the
pretraining ones) holds no `visual_encoder.*`, which LAVIS takes from eva_vit_g.pth
(`eva_tower_from_lavis`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vlforge.models.layers.convert import BERT_FUSED, BERT_RENAMES, map_keys
from vlforge.models.layers.lavis import (
    LavisCheckpoint,
    check_all_mapped,
    lavis_linear,
    lavis_lm_head,
    log_scale_from_temperature,
    prefixed,
)

# LAVIS's Q-Former (under Qformer.bert.) is med.py's BERT with a second feed-forward for the queries:
# BERT's names for the embeddings and attention, the two feed-forwards to vlforge's QFormer names.
_QFORMER_RENAMES: list[tuple[str, str]] = [
    *[(pattern, target) for pattern, target in BERT_RENAMES
      if "token_type" not in pattern and not target.startswith((r"layers.\1.intermediate", r"layers.\1.output",
                                                                 r"layers.\1.norm"))],
    (r"^encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"layers.\1.query_ffn.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output_query\.dense\.", r"layers.\1.query_ffn.output."),
    (r"^encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"layers.\1.query_ffn.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.text_ffn.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.text_ffn.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.text_ffn.norm."),
]

# Positions are an arange; med.py saves them as a buffer.
_QFORMER_IGNORED = (r"^embeddings\.position_ids$",)

_EVA_KEY = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)"
                      r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
                      r"|blocks\.\d+\.attn\.(q_bias|v_bias))$")


def _eva_vision(ckpt: LavisCheckpoint) -> dict[str, torch.Tensor]:
    """`visual_encoder.*` -> a TimmVisionTower (`backbone.*`); q and v biases join a zero key bias."""
    out: dict[str, torch.Tensor] = {}
    part = ckpt.take("visual_encoder.")
    for key, value in part.items():
        name = key[len("visual_encoder."):]
        if not _EVA_KEY.match(name):
            raise KeyError(f"no vlforge name for LAVIS EVA ViT key '{key}'")
        if name.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        out[f"backbone.{name}"] = value
    for key in [k for k in part if k.endswith("attn.q_bias")]:
        block = key[: -len("q_bias")]
        q, v = part[key], part.get(block + "v_bias")
        if v is None:
            raise KeyError(f"LAVIS checkpoint has '{key}' but not '{block}v_bias'")
        out[f"backbone.{block[len('visual_encoder.'):]}qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def _query_encoder(ckpt: LavisCheckpoint, text: bool) -> dict[str, torch.Tensor]:
    """The image tower, ln_vision, the Q-Former and its queries -> QueryImageEncoder."""
    out = prefixed("vision.", _eva_vision(ckpt))
    out.update(prefixed("vision_norm.", lavis_linear(ckpt, "ln_vision")))
    ignored = _QFORMER_IGNORED if text else (*_QFORMER_IGNORED, r"^embeddings\.(word|position)_embeddings\.",
                                            r"^encoder\.layer\.\d+\.(intermediate|output)\.")
    out.update(prefixed("qformer.", map_keys(ckpt.take("Qformer.bert."), "Qformer.bert.", _QFORMER_RENAMES,
                                              BERT_FUSED, ignored, "LAVIS BLIP-2 Q-Former")))
    out["qformer.query_tokens"] = ckpt.get("query_tokens")
    return out


def blip2_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip2` / `blip2_feature_extractor` / `blip2_image_text_matching` (Blip2Qformer: stage 1)
    -> vlforge.models.blip2.pretrain.Blip2Pretrain. A checkpoint without `visual_encoder.*` needs the
    tower's weights merged in first (`eva_tower_from_lavis`)."""
    ckpt = LavisCheckpoint(state_dict)
    if not ckpt.has("visual_encoder."):
        raise KeyError("LAVIS BLIP-2 checkpoint has no 'visual_encoder.' weights: LAVIS saves only what trains, "
                       "and takes the frozen EVA ViT-g from eva_vit_g.pth (load through the zoo row, which reads it)")
    out = prefixed("encoder.", _query_encoder(ckpt, text=True))
    out.update(prefixed("lm_head.", lavis_lm_head(ckpt, "Qformer.cls.predictions.",
                                              "Qformer.bert.embeddings.word_embeddings.weight")))
    for name in ("vision_proj", "text_proj", "itm_head"):
        out.update(prefixed(f"{name}.", lavis_linear(ckpt, name)))
    out["logit_scale.log_scale"] = log_scale_from_temperature(ckpt.get("temp"))
    return check_all_mapped(ckpt, out)


def eva_tower_from_lavis(tower: Mapping[str, torch.Tensor], model: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """eva_vit_g.pth (EVA-CLIP's image tower, as LAVIS's create_eva_vit_g reads it) -> LAVIS's
    `visual_encoder.*` keys for a model node `model` whose `vision.depth` blocks LAVIS builds: LAVIS
    loads the file non-strictly into 39 of its 40 blocks, so the blocks past that depth, and the final
    norm and head that LAVIS's tower does not have, are unused."""
    depth = int(model["vision"]["depth"])
    out: dict[str, torch.Tensor] = {}
    for key, value in tower.items():
        block = re.match(r"^blocks\.(\d+)\.", key)
        if (block and int(block.group(1)) >= depth) or key.startswith(("norm.", "head.", "fc_norm.")):
            continue
        out[f"visual_encoder.{key}"] = value
    return out


def blip2_opt_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip2_opt` (Blip2OPT) -> vlforge.models.blip2.causal_lm.Blip2CausalLM: the image tower
    (merged in from eva_vit_g.pth when the checkpoint has none), ln_vision, the Q-Former without its
    text parts (LAVIS drops them for stage 2), the queries and `opt_proj`.

    The LM is frozen in LAVIS and not saved, but for `opt_model.lm_head.weight`: tied to the word
    embeddings, it is not among the parameters LAVIS's runner checks for `requires_grad`, so it stays.
    It is the LM's own embedding matrix, which the recipe's `language_model.pretrained` loads: ignored.
    A checkpoint holding the whole LM (`opt_model.model.*`) loads it as `language_model.*`."""
    ckpt = LavisCheckpoint(state_dict)
    out = prefixed("encoder.", _query_encoder(ckpt, text=False))
    out.update(prefixed("language_projection.", lavis_linear(ckpt, "opt_proj")))
    if ckpt.has("opt_model.model."):
        out.update({f"language_model.{k[len('opt_model.'):]}": v for k, v in ckpt.take("opt_model.").items()})
    else:
        ckpt.ignore(("opt_model.lm_head",))
    return check_all_mapped(ckpt, out)


def blip2_t5_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip2_t5` (Blip2T5) -> vlforge.models.blip2.seq2seq_lm.Blip2Seq2SeqLM: as
    `blip2_opt_from_lavis`, with `t5_proj` the projection. LAVIS's frozen FlanT5 is not saved, but for
    the encoder's and decoder's `embed_tokens`: aliases of its shared embedding, not parameters of
    their own, so its runner does not drop them; the LM's own, which `language_model.pretrained`
    loads: ignored. A checkpoint holding the whole LM (`t5_model.shared.*`) loads it as `language_model.*`."""
    ckpt = LavisCheckpoint(state_dict)
    out = prefixed("encoder.", _query_encoder(ckpt, text=False))
    out.update(prefixed("language_projection.", lavis_linear(ckpt, "t5_proj")))
    if ckpt.has("t5_model.shared."):
        out.update({f"language_model.{k[len('t5_model.'):]}": v for k, v in ckpt.take("t5_model.").items()})
    else:
        ckpt.ignore(("t5_model.encoder.embed_tokens", "t5_model.decoder.embed_tokens"))
    return check_all_mapped(ckpt, out)
