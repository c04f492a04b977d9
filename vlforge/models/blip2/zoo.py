"""BLIP-2's rows of the model zoo: transformers' BLIP-2 OPT checkpoints, and LAVIS's stage-1, OPT and FlanT5 ones."""
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


_LAVIS_BLIP2 = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"

# bert-base-uncased's tokenizer, to which LAVIS's BLIP-2 adds [DEC] as bos.
_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "config.json")


def _lavis_stage1(name: str, model_type: str, description: str, weights: str, image_size: int) -> ZooEntry:
    # LAVIS's stage-1 Q-Former (Blip2Qformer): ITC and ITG smoothed by 0.1, ln_vision's eps 1e-5 (its
    # LayerNorm default), EVA ViT-g's 1e-6; the pretraining checkpoint leaves the frozen tower to
    # eva_vit_g.pth, the COCO finetune (tower trained) holds its own.
    return ZooEntry(name, model_type, "blip2_pretrain", f"{description} (LAVIS)", f"url:{_LAVIS_BLIP2}/{weights}",
                    "vlforge.models.blip2.convert_lavis:blip2_from_lavis", files=_BERT_TOKENIZER_FILES,
                    weights=(weights,), files_repo="google-bert/bert-base-uncased",
                    overrides=("model=blip2_base", f"model.vision.img_size={image_size}",
                               f"data.train_image.size={image_size}", f"data.eval_image.size={image_size}",
                               "data.max_text_len=32"),
                    origin="lavis", special_tokens=(("bos_token", "[DEC]"),),
                    tower_source=f"url:{_LAVIS_BLIP2}/eva_vit_g.pth",
                    tower_converter="vlforge.models.blip2.convert_lavis:eva_tower_from_lavis")


# OPT's tokenizer, which LAVIS's Blip2OPT loads from the LM's repo.
_OPT_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def _lavis_opt(model_type: str, lm: str, description: str, weights: str, image_size: int, prompt: str) -> ZooEntry:
    # LAVIS's Blip2OPT: texts end with "\n"; the frozen LM (not in LAVIS's checkpoint) loads from its
    # hub repo, as LAVIS loads it; the pretraining checkpoints leave the frozen tower to eva_vit_g.pth.
    return ZooEntry("blip2_opt", model_type, "blip2_caption", f"{description} (LAVIS)", f"url:{_LAVIS_BLIP2}/{weights}",
                    "vlforge.models.blip2.convert_lavis:blip2_opt_from_lavis", files=_OPT_TOKENIZER_FILES,
                    weights=(weights,), files_repo=f"facebook/{lm}", ignore=("language_model.",),
                    overrides=(f"model.language_model.pretrained=facebook/{lm}", f"model.prompt='{prompt}'",
                               "++model.eos_text='\n'", f"model.vision.img_size={image_size}",
                               f"data.train_image.size={image_size}", f"data.eval_image.size={image_size}",
                               "data.max_text_len=32"),
                    origin="lavis", tower_source=f"url:{_LAVIS_BLIP2}/eva_vit_g.pth",
                    tower_converter="vlforge.models.blip2.convert_lavis:eva_tower_from_lavis")


# FlanT5's tokenizer, which LAVIS's Blip2T5 loads from the LM's repo.
_T5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _lavis_t5(model_type: str, lm: str, description: str, weights: str, image_size: int, prompt: str) -> ZooEntry:
    # LAVIS's Blip2T5: the prompt in the encoder, the caption from the decoder (no data prompt); the
    # frozen FlanT5 (not in LAVIS's checkpoint) loads from its hub repo with exact GELU, as LAVIS sets it.
    return ZooEntry("blip2_t5", model_type, "blip2_caption", f"{description} (LAVIS)", f"url:{_LAVIS_BLIP2}/{weights}",
                    "vlforge.models.blip2.convert_lavis:blip2_t5_from_lavis", files=_T5_TOKENIZER_FILES,
                    weights=(weights,), files_repo=f"google/{lm}", ignore=("language_model.",),
                    overrides=("model=blip2_flant5xl", f"model.language_model.pretrained=google/{lm}",
                               f"model.prompt='{prompt}'", "data.prompts.text=''", f"model.vision.img_size={image_size}",
                               f"data.train_image.size={image_size}", f"data.eval_image.size={image_size}",
                               "data.max_text_len=32"),
                    origin="lavis", tower_source=f"url:{_LAVIS_BLIP2}/eva_vit_g.pth",
                    tower_converter="vlforge.models.blip2.convert_lavis:eva_tower_from_lavis")


_STAGE1 = (("blip2", "BLIP-2 EVA ViT-g + Q-Former, ITC + ITM + ITG"),
           ("blip2_feature_extractor", "BLIP-2 EVA ViT-g + Q-Former image and text features"),
           ("blip2_image_text_matching", "BLIP-2 EVA ViT-g + Q-Former ITM and ITC"))

ZOO: tuple[ZooEntry, ...] = (
    *(_lavis_stage1(name, "pretrain", f"{what}, pretrained", "blip2_pretrained.pth", 224) for name, what in _STAGE1),
    *(_lavis_stage1(name, "coco", f"{what}, finetuned on COCO", "blip2_finetune_coco.pth", 364) for name, what in _STAGE1),
    _blip2_opt("pretrain_opt2.7b", "Salesforce/blip2-opt-2.7b", "BLIP-2 EVA ViT-g + Q-Former + OPT-2.7b, pretrained"),
    _blip2_opt("pretrain_opt6.7b", "Salesforce/blip2-opt-6.7b", "BLIP-2 EVA ViT-g + Q-Former + OPT-6.7b, pretrained"),
    _blip2_opt("caption_coco_opt2.7b", "Salesforce/blip2-opt-2.7b-coco", "BLIP-2 OPT-2.7b finetuned on COCO captions"),
    _blip2_opt("caption_coco_opt6.7b", "Salesforce/blip2-opt-6.7b-coco", "BLIP-2 OPT-6.7b finetuned on COCO captions"),
    _lavis_opt("pretrain_opt2.7b", "opt-2.7b", "BLIP-2 OPT-2.7b, pretrained", "blip2_pretrained_opt2.7b.pth", 224, ""),
    _lavis_opt("pretrain_opt6.7b", "opt-6.7b", "BLIP-2 OPT-6.7b, pretrained", "blip2_pretrained_opt6.7b.pth", 224, ""),
    _lavis_opt("caption_coco_opt2.7b", "opt-2.7b", "BLIP-2 OPT-2.7b finetuned on COCO captions",
               "blip2_caption_opt2.7b.pth", 364, "a photo of"),
    _lavis_opt("caption_coco_opt6.7b", "opt-6.7b", "BLIP-2 OPT-6.7b finetuned on COCO captions",
               "blip2_caption_opt6.7b.pth", 364, "a photo of"),
    _lavis_t5("pretrain_flant5xl", "flan-t5-xl", "BLIP-2 FlanT5-XL, pretrained", "blip2_pretrained_flant5xl.pth", 224, ""),
    _lavis_t5("pretrain_flant5xxl", "flan-t5-xxl", "BLIP-2 FlanT5-XXL, pretrained", "blip2_pretrained_flant5xxl.pth",
              224, ""),
    _lavis_t5("caption_coco_flant5xl", "flan-t5-xl", "BLIP-2 FlanT5-XL finetuned on COCO captions",
              "blip2_caption_flant5xl.pth", 364, "a photo of"),
)
