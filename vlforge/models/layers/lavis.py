"""Reading LAVIS (salesforce/LAVIS) BLIP and ALBEF checkpoints, shared by the families' converters
(`blip/convert.py`, `albef/convert.py`): the key bookkeeping and the parts both families have.

A LAVIS `.pth` file is `{"model": state_dict, ...}`; pass `checkpoint["model"]`. Every key of it is
mapped, ignored for a reason written next to the ignore, or named in a KeyError, so a checkpoint of
another layout fails loudly instead of loading half its weights. `load_mapped` then names whatever
the vlforge model expects and the checkpoint did not provide.

Layouts, as LAVIS builds them (lavis/models/blip_models, albef_models, med.py, vit.py):
- `visual_encoder.*`: LAVIS's ViT, timm's names (cls_token, pos_embed, patch_embed.proj, blocks.N.
  {norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), LayerNorm eps 1e-6 (timm's default;
  vlforge's HF-derived BLIP recipes use 1e-5, so build the vision tower without `norm_eps` for these).
- `text_encoder.*` (BLIP and ALBEF retrieval, a med.py BertModel) or `text_encoder.bert.*` +
  `text_encoder.cls.predictions.*` (ALBEF pretraining, a BertForMaskedLM); `text_decoder.bert.*` +
  `text_decoder.cls.predictions.*` (BLIP decoders).
- `temp`: a temperature (logits = similarity / temp); vlforge's LogitScale holds log(1 / temp), shape [1].
  LAVIS clamps temp to [0.001, 0.5]; vlforge caps 1 / temp at `max_logit_scale` (100 by default), so a
  checkpoint with temp < 0.01 converts exactly but is clamped when the model runs.
- Position embeddings are not resized: a checkpoint for another image size fails in `load_mapped` with
  the shape of `pos_embed` (LAVIS interpolates it at load).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from vlforge.models.layers.convert import bert_from_hf, bert_lm_head_from_hf

# LAVIS vit.py parameter names, which are timm's VisionTransformer names: a key outside these is an error.
_LAVIS_VIT_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


class LavisCheckpoint:
    """A LAVIS state dict whose keys are ticked off as they are mapped or deliberately ignored, so
    that `check_all_used` can name every key nobody accounted for."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = dict(state_dict)
        self._used: set[str] = set()

    def has(self, prefix: str) -> bool:
        return any(key.startswith(prefix) for key in self.state_dict)

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        """The keys under `prefix` (prefix kept), marked as used."""
        part = {k: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        if not part:
            raise KeyError(f"LAVIS checkpoint has no keys under '{prefix}'")
        self._used.update(part)
        return part

    def get(self, key: str) -> torch.Tensor:
        if key not in self.state_dict:
            raise KeyError(f"LAVIS checkpoint lacks '{key}'")
        self._used.add(key)
        return self.state_dict[key]

    def ignore(self, names: Iterable[str]) -> None:
        """Mark keys equal to, or under, any of `names` as used; callers say why next to the call."""
        names = tuple(names)
        self._used.update(k for k in self.state_dict if k in names or k.startswith(tuple(n + "." for n in names)))

    def check_all_used(self) -> None:
        left = sorted(set(self.state_dict) - self._used)
        if left:
            raise KeyError(f"no vlforge name for LAVIS checkpoint keys {left}")


def prefixed(prefix: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}


def lavis_vision(ckpt: LavisCheckpoint, prefix: str = "visual_encoder.") -> dict[str, torch.Tensor]:
    """LAVIS's ViT under `prefix` -> a TimmVisionTower (`backbone.*`): the names are already timm's."""
    out: dict[str, torch.Tensor] = {}
    for key, value in ckpt.take(prefix).items():
        name = key[len(prefix):]
        if not _LAVIS_VIT_KEY.match(name):
            raise KeyError(f"no vlforge name for LAVIS ViT key '{key}'")
        out[f"backbone.{name}"] = value
    return out


def lavis_text(ckpt: LavisCheckpoint, prefix: str) -> dict[str, torch.Tensor]:
    # med.py keeps `embeddings.position_ids` as a saved buffer; bert_from_hf drops it (positions are arange).
    return bert_from_hf(ckpt.take(prefix), prefix)


def lavis_lm_head(ckpt: LavisCheckpoint, prefix: str, word_embeddings_key: str) -> dict[str, torch.Tensor]:
    """med.py's `cls.predictions.*` -> BertLMHead. vlforge ties the output projection to the word
    embeddings, as LAVIS does, so an untied checkpoint (different values) is refused, not half-loaded."""
    part = ckpt.take(prefix)
    head = bert_lm_head_from_hf(part, prefix)
    # med.py sets `decoder.bias = bias`, so the state dict holds the one tensor under both names.
    alias = part.get(prefix + "decoder.bias")
    if alias is not None and not torch.equal(alias, head["decoder.bias"]):
        raise ValueError(f"'{prefix}decoder.bias' differs from '{prefix}bias'; LAVIS keeps them as one tensor")
    known = {prefix + name for name in ("bias", "decoder.bias", "decoder.weight", "transform.dense.weight",
                                        "transform.dense.bias", "transform.LayerNorm.weight",
                                        "transform.LayerNorm.bias")}
    unknown = sorted(set(part) - known)
    if unknown:
        raise KeyError(f"no vlforge name for LAVIS LM head keys {unknown}")
    if not torch.equal(head["decoder.weight"], ckpt.get(word_embeddings_key)):
        raise ValueError(f"'{prefix}decoder.weight' differs from '{word_embeddings_key}'; vlforge ties them")
    return head


def lavis_linear(ckpt: LavisCheckpoint, name: str) -> dict[str, torch.Tensor]:
    return {"weight": ckpt.get(f"{name}.weight"), "bias": ckpt.get(f"{name}.bias")}


def log_scale_from_temperature(temp: torch.Tensor) -> torch.Tensor:
    """LAVIS's `temp` (logits = sim / temp, a 0-dim parameter) -> LogitScale.log_scale = log(1 / temp),
    shape [1]; computed in float64 so the only rounding is the final cast."""
    if temp.numel() != 1 or not bool(temp.reshape(()) > 0):
        raise ValueError(f"LAVIS 'temp' must be one positive number, got {temp}")
    dtype = torch.promote_types(temp.dtype, torch.float32)
    return (-torch.log(temp.detach().double())).reshape(1).to(dtype)


def check_all_mapped(ckpt: LavisCheckpoint, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ckpt.check_all_used()
    return out
