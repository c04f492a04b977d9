"""transformers' BLIP-2 checkpoints -> vlforge's Blip2CausalLM: the state dict by key mapping, the model node
from the checkpoint's config (`blip2_dimensions`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from vlforge.models.blip.convert import blip_vision_from_hf
from vlforge.models.language.causal_lm import language_model_config_node
from vlforge.models.layers.convert import map_keys

# transformers' Blip2QFormerModel names -> vlforge.models.fusion.qformer.QFormer names.
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
    vlforge.models.blip2.causal_lm.Blip2CausalLM.

    HF's `vision_model.post_layernorm` is BLIP-2's LayerNorm on the tower's output (LAVIS's ln_vision),
    vlforge's `encoder.vision_norm`; the tower itself ends without a norm. The LM's keys keep their
    names under `language_model.`; a tied LM head, which `save_pretrained` leaves out, is the word
    embeddings once loaded (load with `ignore=("language_model.lm_head.weight",)`)."""
    tower = {k: v for k, v in state_dict.items() if not k.startswith("vision_model.post_layernorm.")}
    out = {f"encoder.vision.{k}": v for k, v in blip_vision_from_hf(tower).items()}
    for kind in ("weight", "bias"):
        out[f"encoder.vision_norm.{kind}"] = state_dict[f"vision_model.post_layernorm.{kind}"]
    qformer = map_keys(state_dict, "qformer.", _QFORMER_RENAMES, _QFORMER_FUSED, _QFORMER_TEXT_FFN, "BLIP-2 Q-Former")
    out.update({f"encoder.qformer.{k}": v for k, v in qformer.items()})
    out["encoder.qformer.query_tokens"] = state_dict["query_tokens"]
    known = ("vision_model.", "qformer.", "query_tokens", "language_projection.", "language_model.")
    unknown = [k for k in state_dict if not k.startswith(known)]
    if unknown:
        raise KeyError(f"no vlforge name for BLIP-2 checkpoint keys {unknown[:10]} ({len(unknown)})")
    out.update({k: v for k, v in state_dict.items() if k.startswith(("language_projection.", "language_model."))})
    return out


def blip2_dimensions(hf_config: Any) -> dict[str, Any]:
    """Model-node values of an HF BLIP-2 checkpoint's config (Blip2Config with a decoder-only LM): the
    EVA ViT (no final norm: BLIP-2's LayerNorm on its output is the model's `vision_norm`), the Q-Former,
    and the LM, built from its config here and loaded from the same weights file."""
    if not hf_config.use_decoder_only_language_model:
        raise ValueError(f"BLIP-2 with a {hf_config.text_config.model_type} (encoder-decoder) LM: vlforge's "
                         "Blip2CausalLM takes decoder-only LMs (OPT, Llama, ...)")
    vision, qformer = hf_config.vision_config, hf_config.qformer_config

    # Built in the default dtype, as the rest of the model (the published files hold fp32 weights).
    lm = language_model_config_node(hf_config.text_config, keep_dtype=False)
    return {
        "vision": {"img_size": vision.image_size, "patch_size": vision.patch_size, "embed_dim": vision.hidden_size,
                   "depth": vision.num_hidden_layers, "num_heads": vision.num_attention_heads,
                   "mlp_ratio": vision.intermediate_size / vision.hidden_size, "norm_eps": vision.layer_norm_eps,
                   "final_norm": False},
        "qformer": {"num_queries": hf_config.num_query_tokens, "width": qformer.hidden_size,
                    "layers": qformer.num_hidden_layers, "heads": qformer.num_attention_heads,
                    "intermediate": qformer.intermediate_size, "cross_every": qformer.cross_attention_frequency,
                    "eps": qformer.layer_norm_eps, "activation": qformer.hidden_act},
        "language_model": {"config": lm},
    }


def clip_tower_as_query_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vlforge CLIP run's image tower (`vision.*`) as a BLIP-2 model's frozen tower
    (`encoder.vision.*`), the rest left out: BLIP-2 starts from a contrastively trained tower, as
    LAVIS's from EVA-CLIP (with `trainer.init_partial`, the Q-Former and heads start fresh)."""
    return {f"encoder.{k}": v for k, v in state_dict.items() if k.startswith("vision.")}
