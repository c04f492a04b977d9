"""A published checkpoint's own config file -> the values of a recipe's model node: the dimensions
that zoo entries with `dimensions` take from their source instead of from the recipe."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlforge.models.language.causal_lm import language_model_config_node


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


def open_clip_dimensions(model_cfg: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    """Model-node values of an open_clip checkpoint's `model_cfg` (open_clip_config.json, a ViT CLIP):
    the tower and text dimensions, the embedding width and the activation (QuickGELU for OpenAI's
    weights: the config's `quick_gelu`, else `quick_gelu` as the recipe has it)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if not isinstance(vision.get("patch_size"), int) or "timm_model_name" in vision:
        raise ValueError("open_clip_config.json: only ViT image towers (vision_cfg.patch_size) load here")
    act = "quick_gelu" if model_cfg.get("quick_gelu", quick_gelu) else "gelu"
    return {
        "embed_dim": model_cfg["embed_dim"],
        "vision": {"name": "vit_base_patch16_clip_224", "pretrained": False, "img_size": vision["image_size"],
                   "patch_size": vision["patch_size"], "embed_dim": vision["width"], "depth": vision["layers"],
                   "num_heads": vision["width"] // vision.get("head_width", 64),
                   "mlp_ratio": vision.get("mlp_ratio", 4.0), "act_layer": act},
        "text": {"vocab_size": text["vocab_size"], "width": text["width"], "layers": text["layers"],
                 "heads": text["heads"], "max_len": text["context_length"], "act": act},
    }


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


# Nodes a source's dimensions replace whole (the recipe's LM `pretrained` must not survive beside
# the source's `config`); the others are merged into the recipe's.
_REPLACED_NODES = ("language_model",)


def apply_dimensions(cfg: DictConfig, kind: str, directory: Path) -> None:
    """Set the recipe's model node (and image sizes) to the dimensions in a source's own config file:
    `kind` "blip" / "blip2" (transformers' config.json) or "open_clip" (open_clip_config.json)."""
    if kind in ("blip", "blip2"):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        node = (blip_dimensions(hf_config, str(cfg.model._target_)) if kind == "blip" else blip2_dimensions(hf_config))
        image_size = hf_config.vision_config.image_size
    elif kind == "open_clip":
        model_cfg = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]
        node = open_clip_dimensions(model_cfg, cfg.model.vision.get("act_layer") == "quick_gelu")
        image_size = model_cfg["vision_cfg"]["image_size"]
    else:
        raise ValueError(f"unknown dimensions kind {kind!r}: blip, blip2 or open_clip")
    for key, value in node.items():
        OmegaConf.update(cfg, f"model.{key}", value, merge=key not in _REPLACED_NODES, force_add=True)
    for split in ("train_image", "eval_image"):
        cfg.data[split].size = image_size
