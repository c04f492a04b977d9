"""Key mapping shared by the families' converters (models/<family>/convert.py): renames, projections
that vlforge fuses, and HF BERT's names. `load_mapped` loads a mapped dict strictly, so a key that
maps nowhere is an error that names it, never a silent skip."""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import nn

# HF BERT / BLIP-text / LAVIS med.py names -> vlforge.models.layers.bert names (after the prefix is removed).
BERT_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.word_embeddings\.", "word_embeddings."),
    (r"^embeddings\.position_embeddings\.", "position_embeddings."),
    (r"^embeddings\.token_type_embeddings\.", "token_type_embeddings."),
    (r"^embeddings\.LayerNorm\.", "embed_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.dense."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.self\.query\.", r"layers.\1.cross_attention.query."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attention.dense."),
    (r"^encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.norm."),
]


# Separate projections that vlforge fuses: (pattern of the parts, target, order of the parts).
BERT_FUSED: list[tuple[str, str, tuple[str, ...]]] = [
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$",
     r"layers.{0}.attention.query_key_value.{2}", ("query", "key", "value")),
    (r"^encoder\.layer\.(\d+)\.crossattention\.self\.(key|value)\.(weight|bias)$",
     r"layers.{0}.cross_attention.key_value.{2}", ("key", "value")),
]

_BERT_IGNORED = (r"^embeddings\.position_ids$", r"^pooler\.")


def rename_key(key: str, renames: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in renames:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def map_keys(state_dict: Mapping[str, torch.Tensor], prefix: str, renames: list[tuple[str, str]],
              fused_groups: list[tuple[str, str, tuple[str, ...]]], ignored: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """The keys under `prefix`, renamed (`renames`), joined where vlforge fuses separate projections
    (`fused_groups`: pattern with groups (layer, part, kind), target, order of the parts) or left out
    (`ignored` patterns); any other key is a KeyError naming it."""
    out: dict[str, torch.Tensor] = {}
    # target -> (order of the parts, the parts found, one checkpoint key and its part, to name what is missing)
    fused: dict[str, tuple[tuple[str, ...], dict[str, torch.Tensor], str, str]] = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if any(re.search(p, key) for p in ignored):
            continue
        for pattern, target, order in fused_groups:
            match = re.match(pattern, key)
            if match:
                layer, part, kind = match.groups()
                fused.setdefault(target.format(layer, part, kind), (order, {}, full_key, part))[1][part] = value
                break
        else:
            renamed = rename_key(key, renames)
            if renamed is None:
                raise KeyError(f"no vlforge name for {what} checkpoint key '{full_key}'")
            out[renamed] = value
    for target, (order, parts, seen_key, seen_part) in fused.items():
        head, _, tail = seen_key.rpartition(f".{seen_part}.")
        missing = [f"{head}.{p}.{tail}" for p in order if p not in parts]
        if missing:
            raise KeyError(f"checkpoint lacks {missing}, parts of the fused '{target}'")
        out[target] = torch.cat([parts[p] for p in order], dim=0)
    return out


def bert_from_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """An HF BertModel / BlipTextModel (or LAVIS BLIP/ALBEF text encoder) state dict, under `prefix`,
    as a `vlforge.models.layers.bert.BertTextModel` state dict. Keys outside `prefix` are left out."""
    return map_keys(state_dict, prefix, BERT_RENAMES, BERT_FUSED, _BERT_IGNORED, "BERT")


def bert_lm_head_from_hf(state_dict: Mapping[str, torch.Tensor], prefix: str = "cls.predictions.",
                         tied_embedding_key: str | None = None) -> dict[str, torch.Tensor]:
    """BERT's `cls.predictions.*` -> BertLMHead (the tied decoder weight is copied, not shared).
    `save_pretrained` leaves the tied decoder weight out of the file: it is then the word embeddings
    under `tied_embedding_key`."""
    names = {"transform.dense.weight": "dense.weight", "transform.dense.bias": "dense.bias",
             "transform.LayerNorm.weight": "norm.weight", "transform.LayerNorm.bias": "norm.bias",
             "decoder.weight": "decoder.weight", "bias": "decoder.bias"}
    if prefix + "decoder.weight" not in state_dict and tied_embedding_key in state_dict:
        state_dict = {**state_dict, prefix + "decoder.weight": state_dict[tied_embedding_key]}
    missing = [prefix + theirs for theirs in names if prefix + theirs not in state_dict]
    if missing:
        raise KeyError(f"checkpoint lacks LM head keys {missing}")
    out = {ours: state_dict[prefix + theirs] for theirs, ours in names.items()}
    return out


def same(value: torch.Tensor) -> torch.Tensor:
    return value


def load_mapped(module: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore: Iterable[str] = ()) -> None:
    """Strict load that names every missing or unexpected key (and shape mismatches)."""
    ignore = tuple(ignore)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.startswith(ignore)]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise KeyError(f"checkpoint does not fit {type(module).__name__}: missing {missing}, "
                       f"unexpected {unexpected}, shape mismatches {shapes}")
    module.load_state_dict(state_dict, strict=not ignore)
