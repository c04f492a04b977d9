"""SigLIP's pairwise sigmoid loss, exact across data-parallel ranks.

Every (image, text) pair of the global batch is its own binary problem: label +1 for a matching
pair, -1 otherwise, logit `scale * cos(image, text) + bias`. Unlike the softmax of InfoNCE there is
no normalisation over the batch, so the loss splits into blocks: each rank scores its own images
against one rank's texts at a time (the paper's chunked form), holding one [B_local, B_local] block
of logits at once rather than a [B_local, B_global] row.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlforge.models.layers.contrastive import all_gather_rows, gather_with_grad


class LogitBias(nn.Module):
    """The learnable bias of the sigmoid logits, a module of its own (ZeRO-3 gathers it through
    forward hooks), shape [1] (ZeRO-3 cannot partition 0-dim parameters)."""

    def __init__(self, init_bias: float) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.full((1,), float(init_bias)))

    def forward(self) -> torch.Tensor:
        return self.bias.squeeze(0)


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """-(1 / B_local) * sum over this rank's images i and every rank's texts j of
    log sigmoid(label_ij * (scale * <image_i, text_j> + bias)); inputs L2-normalised [B_local, D].

    `groups` [B_local] (e.g. `text_groups`): an image and a text of one group are a matching pair
    (label +1) even across ranks; without it only each image's own text is. Ranks must hold equal
    micro batches. DeepSpeed averages gradients over ranks, which turns the per-rank sums over
    B_local images into the single-process loss over the global batch (sum over all pairs / B_global).
    """
    all_text = gather_with_grad(text_emb)
    all_groups = None if groups is None else all_gather_rows(groups)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local = image_emb.shape[0]
    own = torch.eye(local, dtype=torch.bool, device=image_emb.device)
    dtype = torch.promote_types(image_emb.dtype, torch.float32)  # half-precision logits are scored in fp32
    total = image_emb.new_zeros((), dtype=dtype)
    for block in range(world):
        texts = all_text[block * local : (block + 1) * local]
        logits = (logit_scale * image_emb @ texts.t() + logit_bias).to(dtype)
        if all_groups is not None:
            positive = groups[:, None] == all_groups[block * local : (block + 1) * local][None, :]
        else:
            positive = own if block == rank else torch.zeros_like(own)
        labels = positive.float() * 2 - 1
        total = total - F.logsigmoid(labels * logits).sum()
    return total / local
