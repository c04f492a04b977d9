"""`build_vision_tower`: the image tower a recipe's `model.vision` mapping names, timm's or
transformers' CLIP."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from vlforge.core.errors import ConfigError
from vlforge.models.towers.hf_clip import HFCLIPVisionTower
from vlforge.models.towers.timm_tower import TimmVisionTower

VISION_KINDS = ("timm", "hf_clip")


def build_vision_tower(config: Mapping[str, Any]) -> nn.Module:
    """The tower a recipe's `model.vision` mapping names by `kind` ("timm" when absent, or "hf_clip");
    the other keys are that tower's constructor arguments."""
    options = dict(config)
    kind = options.pop("kind", "timm")
    if kind == "timm":
        return TimmVisionTower(**options)
    if kind == "hf_clip":
        return HFCLIPVisionTower(**options)
    raise ConfigError(f"model.vision.kind={kind!r}: expected one of {', '.join(VISION_KINDS)}")
