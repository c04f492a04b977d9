"""Zero-shot classification: class names x prompt templates -> ensembled text classifier."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlforge.core.tokenizers import load_tokenizer
from vlforge.models.layers.contrastive import image_text_similarity
from vlforge.models.protocols import FeatureExtractor


def load_class_names(classes: Sequence[str] | str) -> list[str]:
    """A list in the recipe, or a JSON file holding a list (e.g. the classes.json beside shards)."""
    if isinstance(classes, str):
        if not os.path.isfile(classes):
            raise FileNotFoundError(f"zero-shot class names file '{classes}' does not exist")
        with open(classes, encoding="utf-8") as handle:
            classes = json.load(handle)
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("zero-shot classification needs at least one class name")
    return names


def load_templates(templates: Sequence[str] | str) -> list[str]:
    """Prompt templates with '{}' for the class name: a list in the recipe, or a file holding a JSON
    list or one template per line."""
    if isinstance(templates, str):
        if not os.path.isfile(templates):
            raise FileNotFoundError(f"zero-shot templates file '{templates}' does not exist")
        with open(templates, encoding="utf-8") as handle:
            text = handle.read()
        templates = json.loads(text) if text.lstrip().startswith("[") else [l.strip() for l in text.splitlines() if l.strip()]
    out = [str(t) for t in templates]
    if not out or any("{}" not in t for t in out):
        raise ValueError(f"zero-shot templates must each contain '{{}}', got {out}")
    return out


@torch.no_grad()
def build_zero_shot_classifier(
    model: FeatureExtractor,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenizer: str,
    max_len: int,
    device: torch.device,
) -> torch.Tensor:
    """[num_classes, D]: per class, the normalised mean of its normalised template embeddings."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"zero-shot templates must each contain '{{}}', got {list(templates)}")
    tok = load_tokenizer(tokenizer)
    weights = []
    for name in class_names:
        tokens = tok([t.format(name) for t in templates], padding="longest", truncation=True,
                     max_length=max_len, return_tensors="pt")
        feats = model.extract_features(
            {"text_input_ids": tokens["input_ids"].to(device), "text_attention_mask": tokens["attention_mask"].to(device)},
            mode="text",
        )["text_embeds"]
        weights.append(F.normalize(feats.float().mean(dim=0), dim=-1))
    return torch.stack(weights)


def zero_shot_scores(image_embeds: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return image_text_similarity(image_embeds.float(), classifier)


def describe(class_names: Sequence[str], scores: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    pred = scores.argmax(dim=1)
    return [{"label": class_names[l], "prediction": class_names[p]} for l, p in zip(labels.tolist(), pred.tolist())]
