"""BLIP's rows of the model zoo: transformers' BLIP checkpoints, LAVIS's and the demo runs.

LAVIS rows run as LAVIS does: ViT LayerNorm eps 1e-6 (transformers' port uses 1e-5), BERT's tokenizer
with [DEC] (bos) and [ENC] added, [ENC] in place of [CLS] where the text encoder sees the image (VQA
questions, image-text matching), VQA answers ranked by the label-smoothed (0.1) loss, and LAVIS's image
sizes. Their weights are the files LAVIS's model configs name (lavis/configs/models/blip_*.yaml)."""
from __future__ import annotations

from vlforge.models.zoo_entry import ZooEntry, demo_run

# What loading reads of an HF BLIP repo besides its weights: dimensions and the tokenizer.
_HF_BLIP_FILES = ("config.json", "tokenizer_config.json", "vocab.txt")

_BUCKET = "https://storage.googleapis.com/sfr-vision-language-research"

# bert-base-uncased's tokenizer, which LAVIS loads; its config.json only names the tokenizer class.
_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "config.json")

_LAVIS_BLIP_TOKENS = (("bos_token", "[DEC]"), ("additional_special_tokens", ("[ENC]",)))

_ITM_HEAD = ("itm_head.weight", "itm_head.bias")

# LAVIS's image-text matching model keeps no temperature (it scores ITC by the cosine).
_TEMPERATURE = ("logit_scale.log_scale",)


def _lavis(name: str, model_type: str, recipe: str, description: str, path: str, converter: str,
           overrides: tuple[str, ...] = (), image_size: int = 384, ignore: tuple[str, ...] = ()) -> ZooEntry:
    return ZooEntry(name, model_type, recipe, f"{description} (LAVIS)", f"url:{_BUCKET}/{path}",
                    f"vlforge.models.blip.convert:{converter}", files=_BERT_TOKENIZER_FILES,
                    weights=(path.rpartition("/")[2],), files_repo="google-bert/bert-base-uncased", ignore=ignore,
                    overrides=("model.vision.norm_eps=1e-6", f"++model.vision.img_size={image_size}",
                               f"data.train_image.size={image_size}", f"data.eval_image.size={image_size}", *overrides),
                    origin="lavis", special_tokens=_LAVIS_BLIP_TOKENS)


_ENC = ("++model.enc_token_id='[ENC]'",)
_VQA = (*_ENC, "++model.label_smoothing=0.1", "++model.answer_attends_question_padding=true", "data.max_text_len=35")
_MATCHING = (*_ENC, "data.max_text_len=35")

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
             dimensions="blip", overrides=("++model.answer_attends_question_padding=true",)),
    demo_run("blip_vqa", "blip_vqa_demo", "the BLIP VQA demo's run (runs/blip_vqa_demo)"),
    ZooEntry("blip_retrieval", "coco", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on COCO retrieval",
             "hf:Salesforce/blip-itm-base-coco", "vlforge.models.blip.convert:blip_retrieval_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", ignore=("logit_scale.log_scale",)),
    ZooEntry("blip_retrieval", "flickr", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on Flickr30k",
             "hf:Salesforce/blip-itm-base-flickr", "vlforge.models.blip.convert:blip_retrieval_from_hf",
             files=_HF_BLIP_FILES, dimensions="blip", ignore=("logit_scale.log_scale",)),
    demo_run("blip_retrieval", "blip_retrieval_demo", "the BLIP retrieval demo's run (runs/blip_retrieval_demo)"),
    _lavis("blip_caption", "base_coco", "blip_caption", "BLIP ViT-B/16 captioner finetuned on COCO",
           "LAVIS/models/BLIP/blip_coco_caption_base.pth", "blip_caption_from_lavis"),
    _lavis("blip_caption", "large_coco", "blip_caption", "BLIP ViT-L/16 captioner finetuned on COCO",
           "BLIP/models/model_large_caption.pth", "blip_caption_from_lavis", ("model=blip_caption_large",)),
    _lavis("blip_vqa", "vqav2", "blip_vqa", "BLIP ViT-B/16 VQA finetuned on VQAv2",
           "BLIP/models/model_base_vqa_capfilt_large.pth", "blip_vqa_from_lavis", _VQA, image_size=480),
    _lavis("blip_vqa", "okvqa", "blip_vqa", "BLIP ViT-B/16 VQA finetuned on OK-VQA",
           "LAVIS/models/BLIP/blip_okvqa.pth", "blip_vqa_from_lavis", _VQA, image_size=480),
    _lavis("blip_vqa", "aokvqa", "blip_vqa", "BLIP ViT-B/16 VQA finetuned on A-OKVQA",
           "LAVIS/models/BLIP/blip_aokvqa.pth", "blip_vqa_from_lavis", _VQA, image_size=480),
    _lavis("blip_retrieval", "coco", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on COCO retrieval",
           "LAVIS/models/BLIP/blip_coco_retrieval.pth", "blip_retrieval_from_lavis", _MATCHING),
    _lavis("blip_retrieval", "flickr", "blip_retrieval", "BLIP ViT-B/16 ITC + ITM finetuned on Flickr30k",
           "LAVIS/models/BLIP/blip_flickr_retrieval.pth", "blip_retrieval_from_lavis", _MATCHING),
    _lavis("blip_image_text_matching", "base", "blip_retrieval", "BLIP ViT-B/16 ITM + ITC finetuned on COCO",
           "BLIP/models/model_base_retrieval_coco.pth", "blip_retrieval_from_lavis", _MATCHING, ignore=_TEMPERATURE),
    _lavis("blip_image_text_matching", "large", "blip_retrieval", "BLIP ViT-L/16 ITM + ITC finetuned on COCO",
           "BLIP/models/model_large_retrieval_coco.pth", "blip_retrieval_from_lavis",
           ("model=blip_retrieval_large", *_MATCHING), ignore=_TEMPERATURE),
    _lavis("blip_feature_extractor", "base", "blip_retrieval", "BLIP ViT-B/16 unimodal and multimodal features, pretrained",
           "BLIP/models/model_base_capfilt_large.pth", "blip_feature_extractor_from_lavis", _ENC, image_size=224,
           ignore=_ITM_HEAD),
)
