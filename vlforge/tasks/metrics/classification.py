"""Classification accuracy from scores."""
from __future__ import annotations

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """top-k accuracy for each k (k capped at the number of classes), plus mean per-class top-1."""
    num_classes = scores.shape[1]
    order = scores.argsort(dim=1, descending=True)
    hits = order == labels[:, None]
    out = {f"top{k}": hits[:, : min(k, num_classes)].any(dim=1).float().mean().item() for k in ks}
    per_class = list(per_class_accuracy(scores, labels).values())
    out["mean_per_class"] = sum(per_class) / len(per_class)
    return out


def per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Top-1 accuracy of each class that has at least one sample, by class index."""
    top1 = (scores.argmax(dim=1) == labels).float()
    return {c: top1[labels == c].mean().item() for c in range(scores.shape[1]) if (labels == c).any()}
