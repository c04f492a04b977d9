"""BLIP's rows of the model zoo: transformers' BLIP checkpoints and the demo runs."""
from __future__ import annotations

from vlforge.models.zoo_entry import ZooEntry, demo_run

# What loading reads of an HF BLIP repo besides its weights: dimensions and the tokenizer.
_HF_BLIP_FILES = ("config.json", "tokenizer_config.json", "vocab.txt")

ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("blip_caption", "base_coco", "blip_caption", "BLIP ViT-B/16 captioner finetuned on COCO",
             "hf:Salesforce/blip-image-captioning-base", "vlforge.models.blip.convert:blip_caption_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip"),
    ZooEntry("blip_caption", "large_coco", "blip_caption", "BLIP ViT-L/16 captioner finetuned on COCO",
             "hf:Salesforce/blip-image-captioning-large", "vlforge.models.blip.convert:blip_caption_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", overrides=("model=blip_caption_large",)),
    demo_run("blip_caption", "blip_caption_demo", "the caption demo's run (runs/blip_caption_demo)"),
    ZooEntry("blip_vqa", "vqav2", "blip_vqa", "BLIP ViT-B/16 VQA finetuned on VQAv2",
             "hf:Salesforce/blip-vqa-base", "vlforge.models.blip.convert:blip_vqa_from_hf", files=_HF_BLIP_FILES,
             dimensions="blip"),
    demo_run("blip_vqa", "blip_vqa_demo", "the BLIP VQA demo's run (runs/blip_vqa_demo)"),
    ZooEntry("blip_retrieval", "coco", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on COCO retrieval",
             "hf:Salesforce/blip-itm-base-coco", "vlforge.models.blip.convert:blip_retrieval_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", ignore=("logit_scale.log_scale",)),
    ZooEntry("blip_retrieval", "flickr", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on Flickr30k",
             "hf:Salesforce/blip-itm-base-flickr", "vlforge.models.blip.convert:blip_retrieval_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", ignore=("logit_scale.log_scale",)),
    demo_run("blip_retrieval", "blip_retrieval_demo", "the BLIP retrieval demo's run (runs/blip_retrieval_demo)"),
)
