"""Position embeddings of a ViT checkpoint made for another image size, resampled to a model's grid."""
from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn


def fit_position_embeddings(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state_dict` with every `*pos_embed` whose grid differs from `model`'s resampled to it (bicubic,
    the class token kept), as BLIP does when it finetunes its 224 px pretraining at 384 px. Works on a
    ZeRO-3 partitioned model (the full shape is read from `ds_shape`). Entries that are not a square
    grid after one class token are left as they are, for the loader's shape check to report."""
    out = dict(state_dict)
    for key, param in model.named_parameters():
        source = state_dict.get(key)
        target = tuple(getattr(param, "ds_shape", param.shape))
        if (not key.endswith("pos_embed") or source is None or tuple(source.shape) == target or source.ndim != 3
                or len(target) != 3 or source.shape[-1] != target[-1]):
            continue
        prefix = 1  # the class token: BLIP / ALBEF / CLIP ViTs carry one
        side = round((target[1] - prefix) ** 0.5)
        if side * side + prefix != target[1]:
            continue
        # Bicubic without antialiasing, as BLIP (LAVIS, transformers) resamples; timm antialiases by default.
        out[key] = resample_abs_pos_embed(source.float(), [side, side], num_prefix_tokens=prefix,
                                          antialias=False).to(source.dtype)
    return out
