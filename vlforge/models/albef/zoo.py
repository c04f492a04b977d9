"""ALBEF's rows of the model zoo: LAVIS's finetunes (retrieval, VQA, SNLI-VE classification), its feature
extractor, and the demo runs."""
from __future__ import annotations

from vlforge.models.zoo_entry import ZooEntry, demo_run

# BERT's tokenizer, for LAVIS's ALBEF checkpoints (LAVIS loads bert-base-uncased's): its config.json only
# names the tokenizer class (transformers needs it: the tokenizer_config.json names none).
_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "config.json")

# The MLM heads of vlforge's ALBEF, which LAVIS's ALBEF retrieval checkpoints do not have (a retrieval
# finetune trains no MLM; the recipe's mlm: false never runs them): they keep their initialisation, but
# for decoder.weight, the word embedding matrix (tied), which loads.
_ALBEF_MLM_HEADS = tuple(f"{encoders}.mlm_head.{name}" for encoders in ("model", "momentum_model")
                         for name in ("dense.weight", "dense.bias", "norm.weight", "norm.bias", "decoder.weight",
                                      "decoder.bias"))

_BUCKET = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/ALBEF"


def _lavis(name: str, model_type: str, recipe: str, description: str, url: str, converter: str,
           ignore: tuple[str, ...] = (), overrides: tuple[str, ...] = ()) -> ZooEntry:
    # ALBEF's ViT keeps timm's LayerNorm eps (1e-6), as its recipes do, and its tokenizer is BERT's as is.
    return ZooEntry(name, model_type, recipe, f"{description} (LAVIS)", f"url:{url}",
                    f"vlforge.models.albef.convert:{converter}", files=_BERT_TOKENIZER_FILES,
                    weights=(url.rpartition("/")[2],), files_repo="google-bert/bert-base-uncased", ignore=ignore,
                    overrides=overrides, origin="lavis")


# What the feature extractor leaves at its initialisation: LAVIS's has no ITM head and no queues.
_FEATURE_EXTRACTOR_UNUSED = ("itm_head.weight", "itm_head.bias", "image_queue", "text_queue", "queue_ptr",
                             "momentum_ready", "forward_steps")

ZOO: tuple[ZooEntry, ...] = (
    demo_run("albef_vqa", "albef_vqa_demo", "the ALBEF VQA demo's run (runs/albef_vqa_demo)"),
    demo_run("albef_retrieval", "albef_retrieval_demo", "the ALBEF retrieval demo's run (runs/albef_retrieval_demo)"),
    _lavis("albef_retrieval", "coco", "albef_retrieval", "ALBEF ViT-B/16 ITC + ITM finetuned on COCO retrieval",
           f"{_BUCKET}/albef_coco_retrieval_lavis.pt", "albef_retrieval_from_lavis", ignore=_ALBEF_MLM_HEADS),
    _lavis("albef_retrieval", "flickr", "albef_retrieval", "ALBEF ViT-B/16 ITC + ITM finetuned on Flickr30k",
           f"{_BUCKET}/albef_flickr_retrieval_lavis.pt", "albef_retrieval_from_lavis", ignore=_ALBEF_MLM_HEADS),
    # LAVIS finetunes and ranks with the LM loss smoothed by 0.1 (med.py BertLMHeadModel).
    _lavis("albef_vqa", "vqav2", "albef_vqa", "ALBEF ViT-B/16 VQA finetuned on VQAv2",
           f"{_BUCKET}/albef_vqav2_lavis.pt", "albef_vqa_from_lavis", overrides=("++model.label_smoothing=0.1",)),
    # SNLI-VE (entailment, neutral, contradiction), at 384 px as LAVIS evaluates it.
    _lavis("albef_classification", "ve", "albef_pretrain", "ALBEF ViT-B/16 image-text entailment finetuned on SNLI-VE",
           f"{_BUCKET}/albef_snli_ve_lavis.pt", "albef_classification_from_lavis",
           overrides=("model=albef_classification_base", "data.train_image.size=384", "data.eval_image.size=384")),
    _lavis("albef_feature_extractor", "base", "albef_pretrain", "ALBEF ViT-B/16 unimodal features, pretrained",
           "https://storage.googleapis.com/sfr-pcl-data-research/ALBEF/ALBEF.pth", "albef_feature_extractor_from_lavis",
           ignore=_FEATURE_EXTRACTOR_UNUSED),
)
