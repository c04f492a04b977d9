"""Image-text pretraining (CLIP-style), evaluated by zero-shot classification and ITC retrieval."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from vlforge.config.schema import DataConfig
from vlforge.core.tokenizers import load_tokenizer
from vlforge.models.layers.contrastive import image_text_similarity
from vlforge.models.protocols import FeatureExtractor, ImageTextMatcher, require
from vlforge.tasks.base import ImageTextTask
from vlforge.tasks.evaluation import EvalResult, EvalStep, model_device
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

    table_columns = ("image", "image_id", "label", "prediction")
    # ITM re-ranking runs the model on every rank, each re-scoring its share of the rows.
    summarize_on_every_rank = True

    def eval_state(self, model: nn.Module, data: DataConfig, split: str) -> _PretrainState:
        rerank = self.retrieval and self.itm_rerank_k > 0
        return _PretrainState(require(model, FeatureExtractor, f"the {type(self).__name__} evaluation"),
                              require(model, ImageTextMatcher, "task.itm_rerank_k > 0") if rerank else None,
                              load_tokenizer(data.tokenizer), data, split, model_device(model))

    def eval_step(self, model: nn.Module, batch: dict, state: _PretrainState, report_rows: int) -> EvalStep:
        records: dict[str, list[Any]] = {"image_id": list(batch["image_id"])}
        if state.matcher is not None:  # one tower forward for both: the ITC embeddings and what ITM reads
            itm_tokens, image_embeds = state.matcher.image_features(batch["image"])
            records["itm_tokens"] = list(itm_tokens.cpu())
        else:
            image_embeds = state.features.extract_features(batch, mode="image")["image_embeds"]
        records["image"] = list(image_embeds.float().cpu())
        if "label" in batch:
            records["label"] = [int(label) for label in batch["label"]]
        if self.retrieval and "captions" in batch:
            flat = [c for caps in batch["captions"] for c in caps]
            tokens = state.tokenizer(flat, padding="longest", truncation=True, max_length=state.data.max_text_len,
                                     return_tensors="pt")
            records["text"] = list(state.features.extract_features(
                {"text_input_ids": tokens["input_ids"].to(state.device),
                 "text_attention_mask": tokens["attention_mask"].to(state.device)},
                mode="text",
            )["text_embeds"].float().cpu())
            records["caption"] = flat
            records["text_owner"] = [i for i, caps in zip(batch["image_id"], batch["captions"]) for _ in caps]
        return EvalStep(records, [[batch["image"][row].cpu()] for row in range(min(len(batch["image_id"]), report_rows))])

    def summarize(self, records: dict[str, list[Any]], table: list[list[Any]], state: _PretrainState) -> EvalResult:
        image_ids = records.get("image_id", [])
        result = EvalResult(metrics={"num_images": float(len(image_ids))})
        image_embeds = torch.stack(records["image"])
        if self.zero_shot_classes is not None:
            if len(records.get("label", [])) != len(image_ids):
                raise ValueError(f"zero-shot evaluation needs a 'label' in every sample of data.{state.split}")
            names = load_class_names(self.zero_shot_classes)
            classifier = build_zero_shot_classifier(state.features, names, self.zero_shot_templates,
                                                    state.data.tokenizer, state.data.max_text_len, state.device).cpu()
            scores = zero_shot_scores(image_embeds, classifier)
            labels = torch.tensor(records["label"])
            result.metrics.update({f"zeroshot_{k}": v for k, v in topk_accuracy(scores, labels).items()})
            counts = torch.bincount(labels, minlength=len(names)).tolist()
            result.results = [{"class": names[c], "top1": acc, "num_images": counts[c]}
                              for c, acc in per_class_accuracy(scores, labels).items()]
            # Rank 0's rows come first in the merged order, so its pixels line up with the first rows.
            result.table_columns = list(self.table_columns)
            result.table_rows = [[row[0], i, d["label"], d["prediction"]]
                                 for row, i, d in zip(table, image_ids, describe(names, scores, labels))]
        if records.get("text"):
            index = {image_id: i for i, image_id in enumerate(image_ids)}
            sim = image_text_similarity(image_embeds, torch.stack(records["text"]))
            owners = [index[owner] for owner in records["text_owner"]]
            wording = records["caption"] if self.retrieval_match == "wording" else None
            result.metrics.update({f"retrieval_{k}": v for k, v in recall_at_k(sim, owners, captions=wording).items()})
            if state.matcher is not None:
                i2t, t2i = itm_rerank(state.matcher, sim, records["itm_tokens"], records["caption"], state.tokenizer,
                                      state.data.max_text_len, self.itm_rerank_k, state.device)
                result.metrics.update({f"retrieval_itm_{k}": v
                                       for k, v in recall_at_k(i2t, owners, sim_t2i=t2i, captions=wording).items()})
        return result


@dataclass
class _PretrainState:
    features: FeatureExtractor
    matcher: ImageTextMatcher | None  # with task.itm_rerank_k > 0
    tokenizer: Any
    data: DataConfig
    split: str
    device: torch.device
