"""A published checkpoint's own config file -> the values of a recipe's model node: the dimensions
that zoo entries with `dimensions` take from their source instead of from the recipe. Each family's
reading of its source's config is in its convert.py; this picks one by the entry's `dimensions`."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vlforge.models.blip.convert import blip_dimensions
from vlforge.models.blip2.convert import blip2_dimensions
from vlforge.models.clip.convert import open_clip_dimensions

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
