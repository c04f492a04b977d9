"""Image<->text recall@k over a similarity matrix."""
from __future__ import annotations

from typing import Sequence

import torch


def _ranks(sim: torch.Tensor, positives: list[list[int]]) -> torch.Tensor:
    """Rank (0 = best) of the best positive of each row: how many candidates score strictly higher.

    Ties are resolved in favour of the positive; a row with no positive counts as never retrieved.
    """
    ranks = torch.empty(sim.shape[0], dtype=torch.long)
    for row, pos in enumerate(positives):
        if not pos:
            ranks[row] = sim.shape[1]
            continue
        best = sim[row, pos].max()
        ranks[row] = (sim[row] > best).sum()
    return ranks


def _positives(text_to_image: list[int], num_images: int,
               captions: Sequence[str] | None) -> tuple[list[list[int]], list[list[int]]]:
    """(texts of each image, images of each text). With `captions`, a text is a positive of every
    image that has a caption with exactly its wording, not only of the image it was written for."""
    texts_of: list[list[int]] = [[] for _ in range(num_images)]
    for text, image in enumerate(text_to_image):
        texts_of[image].append(text)
    if captions is None:
        return texts_of, [[image] for image in text_to_image]
    if len(captions) != len(text_to_image):
        raise ValueError(f"recall_at_k: {len(captions)} captions for {len(text_to_image)} texts")
    same_wording: dict[str, list[int]] = {}
    for text, caption in enumerate(captions):
        same_wording.setdefault(caption, []).append(text)
    images_of_wording = {w: sorted({text_to_image[t] for t in ts}) for w, ts in same_wording.items()}
    texts_of = [sorted({t for own in texts for t in same_wording[captions[own]]}) for texts in texts_of]
    return texts_of, [images_of_wording[caption] for caption in captions]


def recall_at_k(sim_i2t: torch.Tensor, text_to_image: list[int], ks: tuple[int, ...] = (1, 5, 10),
                sim_t2i: torch.Tensor | None = None, captions: Sequence[str] | None = None) -> dict[str, float]:
    """`sim_i2t` [num_images, num_texts]; `text_to_image[t]` is the image index caption t describes.
    `sim_t2i` [num_texts, num_images] ranks images for each text when it differs from `sim_i2t.t()`
    (after ITM re-ranking, each direction re-scores its own top-k).

    `captions` (the text of each caption) makes hits match by wording: a retrieved caption worded
    exactly like one of the image's own is a hit, as is an image that has the query's wording among
    its captions. Use it where many images legitimately share a caption (templated data such as the
    demo's); without it only the image a caption was written for counts, as in COCO and Flickr.

    Returns txt_r{k} (image -> text), img_r{k} (text -> image), their means and r_mean, in percent-free
    fractions (0..1).
    """
    texts_of, images_of = _positives(text_to_image, sim_i2t.shape[0], captions)
    i2t = _ranks(sim_i2t, texts_of)
    t2i = _ranks(sim_i2t.t() if sim_t2i is None else sim_t2i, images_of)
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = (i2t < k).float().mean().item()
    for k in ks:
        out[f"img_r{k}"] = (t2i < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
