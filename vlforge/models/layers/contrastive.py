"""Image-text contrastive loss, exact across data-parallel ranks.

Each rank scores its own rows against the columns of every rank (features all-gathered with their
gradients), so the loss over a global batch is the same whether it runs on one rank or many.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlforge.core.tokenizers import tokenize_texts


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank's loss depends on this rank's rows: their gradient is the sum over ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients flow back to the rank that owns each row."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order, without gradient (labels, momentum features)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


_HASH_BASE, _HASH_MODULUS = 1_000_003, 2_147_483_647


def text_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64, equal for texts with equal token ids (padding ignored, so across ranks too): a
    polynomial hash; two different texts of a batch share one with probability ~B^2 / 2^32."""
    groups = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for column in range(input_ids.shape[1]):
        extended = (groups * _HASH_BASE + input_ids[:, column].long() + 1) % _HASH_MODULUS
        groups = torch.where(attention_mask[:, column].bool(), extended, groups)
    return groups


def image_text_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """[N_image, N_text] cosine similarities of normalised embeddings.

    An image may carry several embeddings ([N, Q, D], BLIP-2's query outputs): its similarity to a
    text is then that of its best-matching one.
    """
    if image_emb.ndim == 3:
        return torch.einsum("iqd,td->iqt", image_emb, text_emb).amax(dim=1)
    return image_emb @ text_emb.t()


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     groups: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE of local rows against global columns; inputs are L2-normalised, text
    [B_local, D] and image [B_local, D] or [B_local, Q, D] (see `image_text_similarity`).

    `groups` [B_local] (e.g. `text_groups`): pairs whose image and text share a group are all
    positives, the target spread evenly over them (as LAVIS's BLIP / ALBEF retrieval finetunes spread
    it over an image's captions by `idx`); with every group distinct this is the plain loss. Ranks must hold equal micro batches. DeepSpeed
    averages gradients over ranks, which turns the per-rank means into the mean over the global batch.
    `label_smoothing` spreads that share of each target over all columns (BLIP-2's stage 1: 0.1).
    """
    all_image, all_text = gather_with_grad(image_emb), gather_with_grad(text_emb)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    local = image_emb.shape[0]
    logits_per_image = logit_scale * image_text_similarity(image_emb, all_text)
    logits_per_text = logit_scale * image_text_similarity(all_image, text_emb).t()
    if groups is None:
        targets = torch.arange(local, device=image_emb.device) + rank * local
        return 0.5 * (F.cross_entropy(logits_per_image, targets, label_smoothing=label_smoothing)
                      + F.cross_entropy(logits_per_text, targets, label_smoothing=label_smoothing))
    same = (groups[:, None] == all_gather_rows(groups)[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[1]
    # An image and its text share a group, so one [B_local, B_global] target serves both directions.
    i2t = -(logits_per_image.float().log_softmax(dim=1) * targets).sum(dim=1).mean()
    t2i = -(logits_per_text.float().log_softmax(dim=1) * targets).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


class LogitScale(nn.Module):
    """The learnable temperature as a module of its own, so ZeRO-3 gathers it through forward hooks.

    Shape [1], not a scalar: ZeRO-3 cannot partition 0-dim parameters.
    """

    def __init__(self, init_temperature: float, max_logit_scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp().squeeze(0)


class DualEncoderFeatures:
    """`extract_features` for a model that defines `encode_image(image)` and
    `encode_text(input_ids, attention_mask)`, each returning normalised embeddings, and (for texts as
    strings) `tokenizer_name`."""

    @torch.no_grad()
    def extract_features(self, samples: dict, mode: str = "multimodal", max_text_len: int = 64) -> dict[str, torch.Tensor]:
        """Normalised embeddings: mode 'image', 'text', or 'multimodal' (both). Texts are
        `text_input_ids/attention_mask` from the collator, or strings under `text_input` (LAVIS's key),
        tokenized with the model's tokenizer."""
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        out: dict[str, torch.Tensor] = {}
        if mode in ("image", "multimodal"):
            out["image_embeds"] = self.encode_image(samples["image"])  # type: ignore[attr-defined]
        if mode in ("text", "multimodal"):
            if "text_input_ids" in samples:
                ids, mask = samples["text_input_ids"], samples["text_attention_mask"]
            else:
                ids, mask = self._tokenize(samples["text_input"], max_text_len)
            out["text_embeds"] = self.encode_text(ids, mask)  # type: ignore[attr-defined]
        return out

    def _tokenize(self, texts: str | list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = getattr(self, "tokenizer_name", None)
        if name is None:
            raise ValueError(f"{type(self).__name__} was built without a tokenizer: pass text_input_ids and "
                             "text_attention_mask, or build it with tokenizer=<directory or hub id>")

        return tokenize_texts(name, texts, max_len, next(self.parameters()).device)  # type: ignore[attr-defined]
