"""Image-text pretraining (CLIP-style), evaluated by zero-shot classification and ITC retrieval."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from vlforge.config.schema import DataConfig
from vlforge.core.distributed import DistEnv
from vlforge.core.tokenizers import load_tokenizer
from vlforge.models.layers.contrastive import image_text_similarity
from vlforge.models.protocols import FeatureExtractor, ImageTextMatcher, require
from vlforge.tasks.base import (
    EvalResult,
    ImageTextTask,
    gather_objects,
    lockstep,
    to_device,
)
from vlforge.tasks.itm_rerank import itm_rerank
from vlforge.tasks.metrics.classification import per_class_accuracy, topk_accuracy
from vlforge.tasks.metrics.retrieval import recall_at_k
from vlforge.tasks.zero_shot import (
    build_zero_shot_classifier,
    describe,
    load_class_names,
    load_templates,
    zero_shot_scores,
)


class ImageTextPretrainTask(ImageTextTask):
    """Train on (image, caption) pairs; evaluate with zero-shot classification and/or ITC retrieval.

    `zero_shot_classes` is a list or a JSON file of class names (samples need a `label`);
    `zero_shot_templates` are prompts with '{}' for the class name (a list, or a file of them, one per
    line or a JSON list); `retrieval` scores image<->text
    recall@1/5/10 over every caption of the split; `itm_rerank_k` > 0 re-ranks each image's and each
    text's top-k by the model's ITM head (BLIP / ALBEF / BLIP-2 evaluation), reported as `itm_*`
    beside the ITC recall. `retrieval_match` "image" counts only the image a caption was written for
    (COCO, Flickr); "wording" also counts images with an identically worded caption (templated data
    such as the demo's, where many scenes share "a large red circle").
    """

    def __init__(
        self,
        zero_shot_classes: Sequence[str] | str | None = None,
        zero_shot_templates: Sequence[str] | str = ("a photo of a {}.",),
        retrieval: bool = True,
        itm_rerank_k: int = 0,
        retrieval_match: str = "image",
    ) -> None:
        if retrieval_match not in ("image", "wording"):
            raise ValueError(f"task.retrieval_match must be 'image' or 'wording', got {retrieval_match!r}")
        self.retrieval_match = retrieval_match
        self.zero_shot_classes = zero_shot_classes
        self.zero_shot_templates = load_templates(zero_shot_templates)
        self.retrieval = retrieval
        self.itm_rerank_k = itm_rerank_k

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, data: DataConfig, dist_env: DistEnv, seed: int) -> EvalResult:
        device = next(model.buffers(), torch.empty(0)).device
        tok = load_tokenizer(data.tokenizer)
        rerank = self.retrieval and self.itm_rerank_k > 0
        features = require(model, FeatureExtractor, f"the {self.__class__.__name__} evaluation")
        matcher = require(model, ImageTextMatcher, "task.itm_rerank_k > 0") if rerank else None
        local: dict[str, list[Any]] = {"image_id": [], "image": [], "label": [], "text": [], "text_owner": [],
                                       "caption": [], "itm_tokens": []}
        pixels: list[torch.Tensor] = []  # the first few images of this rank, for the predictions table
        for batch, real in lockstep(iter(self.eval_loader(split, data, dist_env, seed)), device):
            batch = to_device(batch, device)
            if rerank:  # one tower forward for both: the ITC embeddings and what ITM reads
                itm_tokens, image_embeds = matcher.image_features(batch["image"])
                itm_tokens, image_embeds = itm_tokens.cpu(), image_embeds.float().cpu()
            else:
                itm_tokens = None
                image_embeds = features.extract_features(batch, mode="image")["image_embeds"].float().cpu()
            text_embeds = None
            if self.retrieval and "captions" in batch:
                flat = [c for caps in batch["captions"] for c in caps]
                tokens = tok(flat, padding="longest", truncation=True, max_length=data.max_text_len, return_tensors="pt")
                text_embeds = features.extract_features(
                    {"text_input_ids": tokens["input_ids"].to(device), "text_attention_mask": tokens["attention_mask"].to(device)},
                    mode="text",
                )["text_embeds"].float().cpu()
            if not real:
                continue
            offset = 0
            for row, image_id in enumerate(batch["image_id"]):
                local["image_id"].append(image_id)
                local["image"].append(image_embeds[row])
                if itm_tokens is not None:
                    local["itm_tokens"].append(itm_tokens[row])
                if len(pixels) < 16:
                    pixels.append(batch["image"][row].cpu())
                if "label" in batch:
                    local["label"].append(int(batch["label"][row]))
                if text_embeds is not None:
                    count = len(batch["captions"][row])
                    local["text"].extend(text_embeds[offset : offset + count])
                    local["caption"].extend(batch["captions"][row])
                    local["text_owner"].extend([image_id] * count)
                    offset += count
        merged = _merge(gather_objects(local))
        result = EvalResult(metrics={"num_images": float(len(merged["image_id"]))})
        image_embeds = torch.stack(merged["image"])
        if self.zero_shot_classes is not None:
            if len(merged["label"]) != len(merged["image_id"]):
                raise ValueError(f"zero-shot evaluation needs a 'label' in every sample of data.{split}")
            names = load_class_names(self.zero_shot_classes)
            classifier = build_zero_shot_classifier(model, names, self.zero_shot_templates, data.tokenizer,
                                                    data.max_text_len, device).cpu()
            scores = zero_shot_scores(image_embeds, classifier)
            labels = torch.tensor(merged["label"])
            result.metrics.update({f"zeroshot_{k}": v for k, v in topk_accuracy(scores, labels).items()})
            counts = torch.bincount(labels, minlength=len(names)).tolist()
            result.results = [{"class": names[c], "top1": acc, "num_images": counts[c]}
                              for c, acc in per_class_accuracy(scores, labels).items()]
            # Rank 0's rows come first in the merged order, so its pixels line up with the first rows.
            result.table_columns = ["image", "image_id", "label", "prediction"]
            result.table_rows = [[px, i, d["label"], d["prediction"]]
                                 for px, i, d in zip(pixels, merged["image_id"], describe(names, scores, labels))]
        if merged["text"]:
            index = {image_id: i for i, image_id in enumerate(merged["image_id"])}
            sim = image_text_similarity(image_embeds, torch.stack(merged["text"]))
            owners = [index[owner] for owner in merged["text_owner"]]
            wording = merged["caption"] if self.retrieval_match == "wording" else None
            result.metrics.update({f"retrieval_{k}": v for k, v in recall_at_k(sim, owners, captions=wording).items()})
            if rerank:
                i2t, t2i = itm_rerank(matcher, sim, merged["itm_tokens"], merged["caption"], tok, data.max_text_len,
                                      self.itm_rerank_k, device)
                result.metrics.update({f"retrieval_itm_{k}": v for k, v in recall_at_k(i2t, owners, sim_t2i=t2i, captions=wording).items()})
        return result


def _merge(parts: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {key: [] for key in parts[0]}
    for part in parts:
        for key, values in part.items():
            merged[key].extend(values)
    return merged
