"""The model zoo: a table from (name, model type) to the recipe that builds the model and where its
weights come from. Data, not registration: every entry is listed here and nowhere else.

Names and types follow LAVIS where they overlap. A `demo` type is the run a `_demo` recipe leaves in
`runs/` (train it first); the others name published weights, fetched once into the cache
(`$VLFORGE_HOME`, default `~/.cache/vlforge`) or read from any local directory given as `checkpoint=`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model_type: str
    recipe: str  # recipes/recipe/<recipe>.yaml: the model node and the image / text processors
    description: str
    # Where the weights are: "hf:<repo id>" (an HF-format model directory: its config.json decides the
    # dimensions and its tokenizer files come along), "url:<address>" (one weights file, saved as
    # `weights[0]`; the recipe sets the dimensions) or "run:<directory>" (a vlforge run or export,
    # relative to the working directory).
    source: str
    # "module:function" mapping the source's keys to the model's (none for vlforge runs).
    converter: str | None = None
    # Files of an "hf:" source that loading needs besides one weights file, and the weights files to
    # look for, in order (vlforge.hub.sources).
    files: tuple[str, ...] = ()
    weights: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    # The hub repo a "url:" source's `files` (its tokenizer) come from; its weights come from the url.
    files_repo: str | None = None
    # Which of the source's config files sets the model's dimensions: "blip" / "blip2" (transformers'
    # config.json) or "open_clip" (open_clip_config.json); none: the recipe's (vlforge.hub.dimensions).
    dimensions: str | None = None
    # Model keys the source has no value for, which keep their initialisation (HF BLIP retrieval keeps
    # no temperature: logit_scale).
    ignore: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()  # Hydra overrides on top of the recipe

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def location(self) -> str:
        return self.source.partition(":")[2]


# What loading reads of an HF BLIP repo besides its weights: dimensions and the tokenizer.
_HF_BLIP_FILES = ("config.json", "tokenizer_config.json", "vocab.txt")


# BERT's tokenizer, for LAVIS's ALBEF checkpoints (LAVIS loads bert-base-uncased's): its config.json only
# names the tokenizer class (transformers needs it: the tokenizer_config.json names none).
_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "config.json")


# The MLM heads of vlforge's ALBEF, which LAVIS's ALBEF retrieval checkpoints do not have (a retrieval
# finetune trains no MLM; the recipe's mlm: false never runs them): they keep their initialisation, but
# for decoder.weight, the word embedding matrix (tied), which loads.
_ALBEF_MLM_HEADS = tuple(f"{encoders}.mlm_head.{name}" for encoders in ("model", "momentum_model")
                         for name in ("dense.weight", "dense.bias", "norm.weight", "norm.bias", "decoder.weight",
                                      "decoder.bias"))


# Of an open_clip repo on the hub (timm/*.openai): its config and CLIP's BPE tokenizer files.
_OPEN_CLIP_FILES = ("open_clip_config.json", "tokenizer_config.json", "vocab.json", "merges.txt")

_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


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


def _openai_clip(model_type: str, repo: str, overrides: tuple[str, ...]) -> ZooEntry:
    return ZooEntry("clip_feature_extractor", model_type, "clip_zeroshot", f"OpenAI CLIP {model_type} (open_clip's copy)",
                    f"hf:{repo}", "vlforge.models.clip.convert:clip_from_open_clip", files=_OPEN_CLIP_FILES,
                    weights=_OPEN_CLIP_WEIGHTS, dimensions="open_clip", overrides=overrides)


def _demo(name: str, recipe: str, description: str) -> ZooEntry:
    return ZooEntry(name, "demo", recipe, description, f"run:runs/{recipe}")


ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry("blip_caption", "base_coco", "blip_caption", "BLIP ViT-B/16 captioner finetuned on COCO",
             "hf:Salesforce/blip-image-captioning-base", "vlforge.models.blip.convert:blip_caption_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip"),
    ZooEntry("blip_caption", "large_coco", "blip_caption", "BLIP ViT-L/16 captioner finetuned on COCO",
             "hf:Salesforce/blip-image-captioning-large", "vlforge.models.blip.convert:blip_caption_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", overrides=("model=blip_caption_large",)),
    _demo("blip_caption", "blip_caption_demo", "the caption demo's run (runs/blip_caption_demo)"),
    ZooEntry("blip_vqa", "vqav2", "blip_vqa", "BLIP ViT-B/16 VQA finetuned on VQAv2",
             "hf:Salesforce/blip-vqa-base", "vlforge.models.blip.convert:blip_vqa_from_hf", files=_HF_BLIP_FILES, dimensions="blip"),
    _demo("blip_vqa", "blip_vqa_demo", "the BLIP VQA demo's run (runs/blip_vqa_demo)"),
    _demo("albef_vqa", "albef_vqa_demo", "the ALBEF VQA demo's run (runs/albef_vqa_demo)"),
    ZooEntry("blip_retrieval", "coco", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on COCO retrieval",
             "hf:Salesforce/blip-itm-base-coco", "vlforge.models.blip.convert:blip_retrieval_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", ignore=("logit_scale.log_scale",)),
    ZooEntry("blip_retrieval", "flickr", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on Flickr30k",
             "hf:Salesforce/blip-itm-base-flickr", "vlforge.models.blip.convert:blip_retrieval_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", ignore=("logit_scale.log_scale",)),
    _demo("blip_retrieval", "blip_retrieval_demo", "the BLIP retrieval demo's run (runs/blip_retrieval_demo)"),
    _demo("albef_retrieval", "albef_retrieval_demo", "the ALBEF retrieval demo's run (runs/albef_retrieval_demo)"),
    ZooEntry("albef_retrieval", "coco", "albef_retrieval", "ALBEF ViT-B/16 ITC + ITM finetuned on COCO retrieval (LAVIS)",
             "url:https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/ALBEF/albef_coco_retrieval_lavis.pt",
             "vlforge.models.albef.convert:albef_retrieval_from_lavis", files=_BERT_TOKENIZER_FILES,
             weights=("albef_coco_retrieval_lavis.pt",), files_repo="google-bert/bert-base-uncased",
             ignore=_ALBEF_MLM_HEADS),
    _blip2_opt("pretrain_opt2.7b", "Salesforce/blip2-opt-2.7b", "BLIP-2 EVA ViT-g + Q-Former + OPT-2.7b, pretrained"),
    _blip2_opt("pretrain_opt6.7b", "Salesforce/blip2-opt-6.7b", "BLIP-2 EVA ViT-g + Q-Former + OPT-6.7b, pretrained"),
    _blip2_opt("caption_coco_opt2.7b", "Salesforce/blip2-opt-2.7b-coco", "BLIP-2 OPT-2.7b finetuned on COCO captions"),
    _blip2_opt("caption_coco_opt6.7b", "Salesforce/blip2-opt-6.7b-coco", "BLIP-2 OPT-6.7b finetuned on COCO captions"),
    _openai_clip("ViT-B-32", "timm/vit_base_patch32_clip_224.openai", ("model=clip_vit_b32",)),
    _openai_clip("ViT-B-16", "timm/vit_base_patch16_clip_224.openai", ()),
    _openai_clip("ViT-L-14", "timm/vit_large_patch14_clip_224.openai", ("model=clip_vit_l14",)),
    _demo("clip_feature_extractor", "clip_demo", "the CLIP demo's run (runs/clip_demo)"),
    _demo("llava", "llava_finetune_demo", "the LLaVA demo's finetuned run (runs/llava_finetune_demo)"),
)


def find_entry(name: str, model_type: str) -> ZooEntry:
    for entry in ENTRIES:
        if entry.name == name and entry.model_type == model_type:
            return entry
    types = [e.model_type for e in ENTRIES if e.name == name]
    if types:
        raise ValueError(f"model '{name}' has no type '{model_type}'; its types: {', '.join(types)}")
    names = sorted({e.name for e in ENTRIES})
    raise ValueError(f"unknown model '{name}'; the zoo has: {', '.join(names)}")


class ModelZoo:
    """`print(model_zoo)`: the table of names, types and where their weights come from."""

    def __iter__(self):
        return iter(ENTRIES)

    def __len__(self) -> int:
        return len(ENTRIES)

    def __str__(self) -> str:
        rows = [("name", "model_type", "weights", "description")]
        rows += [(e.name, e.model_type, e.source, e.description) for e in ENTRIES]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    __repr__ = __str__


model_zoo = ModelZoo()
