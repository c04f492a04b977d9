"""Image<->text recall@k over a similarity matrix."""
from __future__ import annotations

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


def recall_at_k(sim_i2t: torch.Tensor, text_to_image: list[int], ks: tuple[int, ...] = (1, 5, 10),
                sim_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """`sim_i2t` [num_images, num_texts]; `text_to_image[t]` is the image index caption t describes.
    `sim_t2i` [num_texts, num_images] ranks images for each text when it differs from `sim_i2t.t()`
    (after ITM re-ranking, each direction re-scores its own top-k).

    Returns txt_r{k} (image -> text), img_r{k} (text -> image), their means and r_mean, in percent-free
    fractions (0..1).
    """
    num_images = sim_i2t.shape[0]
    captions_of: list[list[int]] = [[] for _ in range(num_images)]
    for text, image in enumerate(text_to_image):
        captions_of[image].append(text)
    i2t = _ranks(sim_i2t, captions_of)
    t2i = _ranks(sim_i2t.t() if sim_t2i is None else sim_t2i, [[image] for image in text_to_image])
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = (i2t < k).float().mean().item()
    for k in ks:
        out[f"img_r{k}"] = (t2i < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
