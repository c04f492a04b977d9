"""CLIP's rows of the model zoo: OpenAI's weights as open_clip publishes them, and the demo run."""
from __future__ import annotations

from vlforge.models.zoo_entry import ZooEntry, demo_run

# Of an open_clip repo on the hub (timm/*.openai): its config and CLIP's BPE tokenizer files.
_OPEN_CLIP_FILES = ("open_clip_config.json", "tokenizer_config.json", "vocab.json", "merges.txt")

_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _openai_clip(model_type: str, repo: str, overrides: tuple[str, ...]) -> ZooEntry:
    return ZooEntry("clip_feature_extractor", model_type, "clip_zeroshot", f"OpenAI CLIP {model_type} (open_clip's copy)",
                    f"hf:{repo}", "vlforge.models.clip.convert:clip_from_open_clip", files=_OPEN_CLIP_FILES,
                    weights=_OPEN_CLIP_WEIGHTS, dimensions="open_clip", overrides=overrides, origin="open_clip")


ZOO: tuple[ZooEntry, ...] = (
    _openai_clip("ViT-B-32", "timm/vit_base_patch32_clip_224.openai", ("model=clip_vit_b32",)),
    _openai_clip("ViT-B-16", "timm/vit_base_patch16_clip_224.openai", ()),
    _openai_clip("ViT-L-14", "timm/vit_large_patch14_clip_224.openai", ("model=clip_vit_l14",)),
    demo_run("clip_feature_extractor", "clip_demo", "the CLIP demo's run (runs/clip_demo)"),
)
