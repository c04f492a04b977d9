"""The base and large YAMLs build the published architectures: parameter counts within 0.5% of HF's."""
from __future__ import annotations


import pytest
import torch
import yaml
from hydra.utils import instantiate
from transformers import (BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering,
                          BlipVisionConfig)

from vlforge.config.recipes import RECIPES_DIR


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters count once


def _build(name: str) -> torch.nn.Module:
    node = yaml.safe_load((RECIPES_DIR / "model" / f"{name}.yaml").read_text())
    if "tokenizer" in node:
        node["tokenizer"] = None  # the size does not depend on it; ids are given instead
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
    assert abs(ours - reference) / reference < 0.005, (ours, reference)


def test_blip_retrieval_matches_hf_size() -> None:
    with torch.device("meta"):
        reference = _count(BlipForImageTextRetrieval(BlipConfig()))
        ours = _count(_build("blip_retrieval_base"))
    # vlforge adds the ITC temperature (1 parameter) that HF's retrieval model does not keep.
    assert abs(ours - reference) / reference < 0.005, (ours, reference)


def test_blip_vqa_matches_hf_size() -> None:
    with torch.device("meta"):
        reference = _count(BlipForQuestionAnswering(BlipConfig()))
        ours = _count(_build("blip_vqa_base"))
    assert abs(ours - reference) / reference < 0.005, (ours, reference)
