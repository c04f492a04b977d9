"""open_clip checkpoints -> vlforge's CLIP: the state dict by key mapping (no code of open_clip runs), the
model node from open_clip_config.json (`open_clip_dimensions`)."""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from vlforge.models.layers.convert import rename_key, same

_OPEN_CLIP_BLOCK = [
    (r"ln_1\.", "norm1."),
    (r"attn\.in_proj_weight$", "attn.qkv.weight"),
    (r"attn\.in_proj_bias$", "attn.qkv.bias"),
    (r"attn\.out_proj\.", "attn.proj."),
    (r"ln_2\.", "norm2."),
]

_OPEN_CLIP_SIMPLE = {
    "token_embedding.weight": ("text.token_embedding.weight", same),
    "positional_embedding": ("text.position_embedding.weight", same),
    "ln_final.weight": ("text.norm.weight", same),
    "ln_final.bias": ("text.norm.bias", same),
    "text_projection": ("text_proj.weight", lambda v: v.t()),
    "logit_scale": ("logit_scale.log_scale", lambda v: v.reshape(1)),
    "visual.class_embedding": ("vision.backbone.cls_token", lambda v: v.reshape(1, 1, -1)),
    "visual.positional_embedding": ("vision.backbone.pos_embed", lambda v: v.unsqueeze(0)),
    "visual.conv1.weight": ("vision.backbone.patch_embed.proj.weight", same),
    "visual.ln_pre.weight": ("vision.backbone.norm_pre.weight", same),
    "visual.ln_pre.bias": ("vision.backbone.norm_pre.bias", same),
    "visual.ln_post.weight": ("vision.backbone.norm.weight", same),
    "visual.ln_post.bias": ("vision.backbone.norm.bias", same),
    "visual.proj": ("vision_proj.weight", lambda v: v.t()),
}


def clip_from_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict -> vlforge.models.clip.model.CLIP (timm ViT image tower, `pool: last`
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
                renamed = rename_key(rest, _OPEN_CLIP_BLOCK)
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
