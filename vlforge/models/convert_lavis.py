"""LAVIS (salesforce/LAVIS) BLIP and ALBEF checkpoints -> vlforge state dicts, by key mapping.

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

from vlforge.models.convert import bert_from_hf, bert_lm_head_from_hf

# LAVIS vit.py parameter names, which are timm's VisionTransformer names: a key outside these is an error.
_LAVIS_VIT_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)
# Momentum encoders and feature queues of LAVIS's BLIP retrieval/pretraining models.
_BLIP_MOMENTUM = ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m")
_QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


class _Checkpoint:
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


def _prefixed(prefix: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}


def _vision(ckpt: _Checkpoint, prefix: str = "visual_encoder.") -> dict[str, torch.Tensor]:
    """LAVIS's ViT under `prefix` -> a TimmVisionTower (`backbone.*`): the names are already timm's."""
    out: dict[str, torch.Tensor] = {}
    for key, value in ckpt.take(prefix).items():
        name = key[len(prefix):]
        if not _LAVIS_VIT_KEY.match(name):
            raise KeyError(f"no vlforge name for LAVIS ViT key '{key}'")
        out[f"backbone.{name}"] = value
    return out


def _text(ckpt: _Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    # med.py keeps `embeddings.position_ids` as a saved buffer; bert_from_hf drops it (positions are arange).
    return bert_from_hf(ckpt.take(prefix), prefix)


def _lm_head(ckpt: _Checkpoint, prefix: str, word_embeddings_key: str) -> dict[str, torch.Tensor]:
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


def _linear(ckpt: _Checkpoint, name: str) -> dict[str, torch.Tensor]:
    return {"weight": ckpt.get(f"{name}.weight"), "bias": ckpt.get(f"{name}.bias")}


def log_scale_from_temperature(temp: torch.Tensor) -> torch.Tensor:
    """LAVIS's `temp` (logits = sim / temp, a 0-dim parameter) -> LogitScale.log_scale = log(1 / temp),
    shape [1]; computed in float64 so the only rounding is the final cast."""
    if temp.numel() != 1 or not bool(temp.reshape(()) > 0):
        raise ValueError(f"LAVIS 'temp' must be one positive number, got {temp}")
    dtype = torch.promote_types(temp.dtype, torch.float32)
    return (-torch.log(temp.detach().double())).reshape(1).to(dtype)


def _finish(ckpt: _Checkpoint, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ckpt.check_all_used()
    return out


def blip_caption_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip_caption` -> vlforge.models.blip.BlipCaptioner."""
    ckpt = _Checkpoint(state_dict)
    out = _prefixed("vision.", _vision(ckpt))
    out.update(_prefixed("text_decoder.", _text(ckpt, "text_decoder.bert.")))
    out.update(_prefixed("lm_head.", _lm_head(ckpt, "text_decoder.cls.predictions.",
                                              "text_decoder.bert.embeddings.word_embeddings.weight")))
    return _finish(ckpt, out)


def _blip_itc_itm(ckpt: _Checkpoint) -> dict[str, torch.Tensor]:
    """The parts vlforge's BlipRetrieval has: image tower, text encoder, ITC projections and
    temperature, ITM head."""
    out = _prefixed("vision.", _vision(ckpt))
    out.update(_prefixed("text_encoder.", _text(ckpt, "text_encoder.")))
    for name in ("vision_proj", "text_proj", "itm_head"):
        out.update(_prefixed(f"{name}.", _linear(ckpt, name)))
    out["logit_scale.log_scale"] = log_scale_from_temperature(ckpt.get("temp"))
    # vlforge's BLIP computes ITC exactly over the global batch (features gathered from all ranks),
    # with no momentum distillation: LAVIS's momentum encoders and feature/id queues are training state
    # of a method vlforge does not run, and nothing in vlforge's BLIP would read them.
    ckpt.ignore(_BLIP_MOMENTUM)
    ckpt.ignore(_QUEUES)
    return out


def blip_retrieval_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip_retrieval` (or `blip_image_text_matching`) -> vlforge.models.blip_retrieval.BlipRetrieval.

    LAVIS replaces [CLS] with [ENC] for ITM: build the model with `enc_token_id` set to that id.
    """
    ckpt = _Checkpoint(state_dict)
    return _finish(ckpt, _blip_itc_itm(ckpt))


def _check_shared(out: Mapping[str, torch.Tensor]) -> None:
    """BlipPretrain shares every decoder weight but self-attention with the encoder, as LAVIS ties
    them; values that differ would be loaded into one tensor, the last one silently winning."""
    for key, value in out.items():
        if not key.startswith("text_decoder.") or re.match(r"text_decoder\.layers\.\d+\.attention\.", key):
            continue
        twin = "text_encoder." + key[len("text_decoder."):]
        if twin in out and not torch.equal(value, out[twin]):
            raise ValueError(f"LAVIS decoder weight for '{key}' differs from the encoder's '{twin}', which "
                             "BlipPretrain(share_weights=True) shares; convert with shared=False")


def blip_pretrain_from_lavis(state_dict: Mapping[str, torch.Tensor], shared: bool = True) -> dict[str, torch.Tensor]:
    """LAVIS `blip_pretrain` -> vlforge.models.blip_pretrain.BlipPretrain.

    `shared` mirrors BlipPretrain's `share_weights`; when true, the decoder's copies of shared weights
    must equal the encoder's (LAVIS ties them, so its checkpoints hold equal copies).
    """
    ckpt = _Checkpoint(state_dict)
    out = _blip_itc_itm(ckpt)
    out.update(_prefixed("text_decoder.", _text(ckpt, "text_decoder.bert.")))
    out.update(_prefixed("lm_head.", _lm_head(ckpt, "text_decoder.cls.predictions.",
                                              "text_decoder.bert.embeddings.word_embeddings.weight")))
    if shared:
        _check_shared(out)
    return _finish(ckpt, out)


def blip_vqa_from_lavis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS `blip_vqa` -> vlforge.models.blip_vqa.BlipVQA."""
    ckpt = _Checkpoint(state_dict)
    out = _prefixed("vision.", _vision(ckpt))
    out.update(_prefixed("text_encoder.", _text(ckpt, "text_encoder.")))
    out.update(_prefixed("text_decoder.", _text(ckpt, "text_decoder.bert.")))
    out.update(_prefixed("lm_head.", _lm_head(ckpt, "text_decoder.cls.predictions.",
                                              "text_decoder.bert.embeddings.word_embeddings.weight")))
    return _finish(ckpt, out)


def _token_types(text: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Original ALBEF (whose checkpoints LAVIS loads) adds token type 0's embedding to every token;
    LAVIS's med.py has no type embeddings and its non-strict load drops the table. "fold" adds row 0
    to every position embedding (the same sum, since the type is always 0), "drop" does what LAVIS
    does, "keep" maps the table (for a model built with `type_vocab_size`)."""
    if mode not in ("fold", "drop", "keep"):
        raise ValueError(f"token_types must be 'fold', 'drop' or 'keep', got {mode!r}")
    if mode == "keep" or "token_type_embeddings.weight" not in text:
        return text
    text = dict(text)
    table = text.pop("token_type_embeddings.weight")
    if mode == "fold":
        text["position_embeddings.weight"] = text["position_embeddings.weight"] + table[0]
    return text


def _albef_encoders(ckpt: _Checkpoint, suffix: str, token_types: str, mlm_head: bool) -> dict[str, torch.Tensor]:
    """One of ALBEF's encoder sets (suffix "" or the momentum copy's "_m") -> albef._Encoders. With
    `mlm_head`, the pretraining layout (a BertForMaskedLM: `text_encoder.bert.*` + `text_encoder.cls.
    predictions.*`); without, the retrieval layout (a BertModel, `text_encoder.*`, and no MLM head)."""
    text = f"text_encoder{suffix}."
    bert = text + "bert." if mlm_head else text
    out = _prefixed("vision.", _vision(ckpt, f"visual_encoder{suffix}."))
    out.update(_prefixed("text.", _token_types(_text(ckpt, bert), token_types)))
    if mlm_head:
        out.update(_prefixed("mlm_head.", _lm_head(ckpt, text + "cls.predictions.",
                                                   bert + "embeddings.word_embeddings.weight")))
    for name in ("vision_proj", "text_proj"):
        out.update(_prefixed(f"{name}.", _linear(ckpt, name + suffix)))
    return out


def _albef(ckpt: _Checkpoint, token_types: str, queues: bool, mlm_head: bool) -> dict[str, torch.Tensor]:
    model = _albef_encoders(ckpt, "", token_types, mlm_head)
    has_momentum = any(ckpt.has(f"{name}_m.") for name in ("visual_encoder", "text_encoder", "vision_proj",
                                                             "text_proj"))
    momentum = _albef_encoders(ckpt, "_m", token_types, mlm_head) if has_momentum else dict(model)
    out = {**_prefixed("model.", model), **_prefixed("momentum_model.", momentum)}
    out.update(_prefixed("itm_head.", _linear(ckpt, "itm_head")))
    out["logit_scale.log_scale"] = log_scale_from_temperature(ckpt.get("temp"))
    out["momentum_ready"] = torch.tensor([has_momentum])
    out["forward_steps"] = torch.zeros(1, dtype=torch.long)  # a finetune ramps alpha up again, as LAVIS's does
    if queues:
        for name in ("image_queue", "text_queue", "queue_ptr"):
            out[name] = ckpt.get(name)
    else:
        # Left to the model's own fresh queues (see the docstring): a queue of another size cannot load.
        ckpt.ignore(("image_queue", "text_queue", "queue_ptr"))
    return out


def albef_from_lavis(state_dict: Mapping[str, torch.Tensor], token_types: str = "fold",
                     queues: bool = True) -> dict[str, torch.Tensor]:
    """LAVIS `albef_pretrain` (or original ALBEF's ALBEF.pth) -> vlforge.models.albef.ALBEF.

    The momentum encoders (`*_m`) become `momentum_model.*` and `momentum_ready` is set, so training
    continues from them instead of re-copying the model. A checkpoint without any momentum keys gets
    copies of the online weights and `momentum_ready` false: what LAVIS's `copy_params` does at build.
    `queues=False` leaves the feature queues out (for a model with another `queue_size`); then load
    with `ignore=("image_queue", "text_queue", "queue_ptr")`. `token_types`: see `_token_types`.
    """
    ckpt = _Checkpoint(state_dict)
    return _finish(ckpt, _albef(ckpt, token_types, queues, mlm_head=True))


def albef_retrieval_from_lavis(state_dict: Mapping[str, torch.Tensor], token_types: str = "fold",
                               queues: bool = True) -> dict[str, torch.Tensor]:
    """LAVIS `albef_retrieval` (albef_coco_retrieval_lavis.pt; original ALBEF's mscoco.pth, as its
    model_retrieval.py builds it, has the same layout) -> vlforge.models.albef.ALBEF, all but the MLM heads.

    The retrieval model's text encoder is a BertModel (`text_encoder.*`, `text_encoder_m.*`), with no
    MLM head: the result has no `model.mlm_head.*` / `momentum_model.mlm_head.*` keys, so load it with
    those ignored (they keep their initialisation; `decoder.weight` is the word embedding matrix, tied,
    and so holds the checkpoint's). A model built with `mlm: false`, as the retrieval recipe is,
    never runs the head. `token_types` and `queues`: see `albef_from_lavis`.
    """
    ckpt = _Checkpoint(state_dict)
    out = _albef(ckpt, token_types, queues, mlm_head=False)
    # LAVIS's `idx_queue` holds the image ids of the queued features (its ITC counts queued captions of
    # the batch's images as positives). vlforge's ALBEF has no image-id queue: its `group_queue`
    # (match_identical_texts) ids texts by their wording, which image ids do not translate to. The
    # queued features load; without their ids they are negatives, as vlforge's ALBEF treats its own.
    ckpt.ignore(("idx_queue",))
    return _finish(ckpt, out)
