"""ITM re-ranking of ITC retrieval (BLIP / ALBEF evaluation): each image's top-k texts and each text's
top-k images are re-scored by the image-grounded text encoder's match logit plus their ITC similarity.

The work is split across ranks by rows, in lockstep (the same number of ITM forwards on every rank,
as ZeRO-3 requires), and the filled rows are gathered. Every rank holds every image's ITM tokens.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from vlforge.models.protocols import ImageTextMatcher
from vlforge.tasks.evaluation import gather_objects

# Below any re-ranked score (an ITM logit plus a cosine similarity): candidates outside the top-k keep
# their ITC order after every re-ranked one, so recall@k beyond the re-ranked k stays ITC's.
UNRANKED = -1e4


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rescore(model: ImageTextMatcher, sim: torch.Tensor, k: int, pairs_per_forward: int, score_rows) -> torch.Tensor:
    """Fill this rank's rows of a [rows, cols] matrix with `score_rows(rows, top_indices)` + ITC."""
    rank, world = _rank_and_world()
    rows = list(range(rank, sim.shape[0], world))
    per_rank = math.ceil(sim.shape[0] / world)
    chunk = max(1, pairs_per_forward // k)
    out: dict[int, torch.Tensor] = {}
    filler = rows[-1] if rows else 0
    for start in range(0, per_rank, chunk):
        real = rows[start : start + chunk]
        # A rank with fewer rows repeats one so that every rank runs the same forwards (ZeRO-3).
        padded = real + [filler] * (chunk - len(real))
        top = sim[padded].topk(k, dim=1)
        scores = score_rows(padded, top.indices).float().cpu().view(len(padded), k)
        for i, row in enumerate(real):
            filled = sim[row] + UNRANKED
            filled[top.indices[i]] = scores[i] + top.values[i]
            out[row] = filled
    merged = {row: values for part in gather_objects(out) for row, values in part.items()}
    return torch.stack([merged[row] for row in range(sim.shape[0])])


@torch.no_grad()
def itm_rerank(model: ImageTextMatcher, sim_i2t: torch.Tensor, image_tokens: Sequence[torch.Tensor], captions: Sequence[str],
               tokenizer, max_len: int, k: int, device: torch.device,
               pairs_per_forward: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t [images, texts], t2i [texts, images]) re-ranked score matrices; outside each row's top-k
    the score is the ITC similarity + UNRANKED."""
    def tokens_of(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokenizer([captions[i] for i in indices], padding="longest", truncation=True, max_length=max_len,
                      return_tensors="pt")
        return t["input_ids"].to(device), t["attention_mask"].to(device)

    def image_to_texts(rows: list[int], top: torch.Tensor) -> torch.Tensor:
        images = torch.stack([image_tokens[r] for r in rows]).to(device).repeat_interleave(top.shape[1], dim=0)
        ids, mask = tokens_of(top.flatten().tolist())
        return model.itm_match_scores(images, ids, mask)

    def text_to_images(rows: list[int], top: torch.Tensor) -> torch.Tensor:
        images = torch.stack([image_tokens[i] for i in top.flatten().tolist()]).to(device)
        ids, mask = tokens_of([r for r in rows for _ in range(top.shape[1])])
        return model.itm_match_scores(images, ids, mask)

    k_texts, k_images = min(k, sim_i2t.shape[1]), min(k, sim_i2t.shape[0])
    i2t = _rescore(model, sim_i2t, k_texts, pairs_per_forward, image_to_texts)
    t2i = _rescore(model, sim_i2t.t().contiguous(), k_images, pairs_per_forward, text_to_images)
    return i2t, t2i
