"""BLIP-2's rows of the model zoo: transformers' BLIP-2 OPT checkpoints."""
from __future__ import annotations

from vlforge.models.zoo_entry import ZooEntry

# An HF BLIP-2 OPT repo: its config (all three parts' dimensions) and OPT's BPE tokenizer; the
# weights are sharded (an index and its shards), the LM's among them.
_HF_BLIP2_FILES = ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt")

_HF_SHARDED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")

def _blip2_opt(model_type: str, repo: str, description: str) -> ZooEntry:
    # LAVIS captions with "a photo of" after COCO finetuning, and with no prompt after pretraining.
    captioner = model_type.startswith("caption_coco")
    return ZooEntry("blip2_opt", model_type, "blip2_caption", description, f"hf:{repo}",
                    "vlforge.models.blip2.convert:blip2_causal_lm_from_hf", files=_HF_BLIP2_FILES,
                    weights=_HF_SHARDED_WEIGHTS, dimensions="blip2", ignore=("language_model.lm_head.weight",),
                    overrides=() if captioner else ("model.prompt=''",))


ZOO: tuple[ZooEntry, ...] = (
    _blip2_opt("pretrain_opt2.7b", "Salesforce/blip2-opt-2.7b", "BLIP-2 EVA ViT-g + Q-Former + OPT-2.7b, pretrained"),
    _blip2_opt("pretrain_opt6.7b", "Salesforce/blip2-opt-6.7b", "BLIP-2 EVA ViT-g + Q-Former + OPT-6.7b, pretrained"),
    _blip2_opt("caption_coco_opt2.7b", "Salesforce/blip2-opt-2.7b-coco", "BLIP-2 OPT-2.7b finetuned on COCO captions"),
    _blip2_opt("caption_coco_opt6.7b", "Salesforce/blip2-opt-6.7b-coco", "BLIP-2 OPT-6.7b finetuned on COCO captions"),
)
