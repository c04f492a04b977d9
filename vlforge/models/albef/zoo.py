"""ALBEF's rows of the model zoo: LAVIS's COCO retrieval finetune and the demo runs."""
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

ZOO: tuple[ZooEntry, ...] = (
    demo_run("albef_vqa", "albef_vqa_demo", "the ALBEF VQA demo's run (runs/albef_vqa_demo)"),
    demo_run("albef_retrieval", "albef_retrieval_demo", "the ALBEF retrieval demo's run (runs/albef_retrieval_demo)"),
    ZooEntry("albef_retrieval", "coco", "albef_retrieval", "ALBEF ViT-B/16 ITC + ITM finetuned on COCO retrieval (LAVIS)",
             "url:https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/ALBEF/albef_coco_retrieval_lavis.pt",
             "vlforge.models.albef.convert:albef_retrieval_from_lavis", files=_BERT_TOKENIZER_FILES,
             weights=("albef_coco_retrieval_lavis.pt",), files_repo="google-bert/bert-base-uncased",
             ignore=_ALBEF_MLM_HEADS, origin="lavis"),
)
