"""ALBEF checkpoints -> vlforge state dicts, by key mapping (no code of theirs runs): LAVIS's `.pth`
(pretraining, retrieval and VQA finetunes, the feature extractor), and the image and text towers of a
vlforge dual encoder."""
from __future__ import annotations

from typing import Mapping

import torch

from vlforge.models.layers.lavis import (
    LavisCheckpoint,
    check_all_mapped,
    lavis_linear,
    lavis_lm_head,
    lavis_text,
    lavis_vision,
    log_scale_from_temperature,
    prefixed,
)


def albef_towers_from_dual_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vlforge dual encoder's (CLIP's, BLIP retrieval's) image tower -> ALBEF's two copies of it,
    `model.vision` and `momentum_model.vision` (`trainer.init_converter` with `init_partial`: the
    text side starts fresh). Both copies, because the momentum model's running statistics are
    buffers, which the first momentum update (parameters only) does not copy."""
    tower = {key.removeprefix("vision."): value for key, value in state_dict.items() if key.startswith("vision.")}
    if not tower:
        raise KeyError("albef_towers_from_dual_encoder: the checkpoint has no 'vision.' weights")
    return {f"{copy}.vision.{key}": value for copy in ("model", "momentum_model") for key, value in tower.items()}


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


def _albef_encoders(ckpt: LavisCheckpoint, suffix: str, token_types: str, mlm_head: bool) -> dict[str, torch.Tensor]:
    """One of ALBEF's encoder sets (suffix "" or the momentum copy's "_m") -> albef._Encoders. With
    `mlm_head`, the pretraining layout (a BertForMaskedLM: `text_encoder.bert.*` + `text_encoder.cls.
    predictions.*`); without, the retrieval layout (a BertModel, `text_encoder.*`, and no MLM head)."""
    text = f"text_encoder{suffix}."
    bert = text + "bert." if mlm_head else text
    out = prefixed("vision.", lavis_vision(ckpt, f"visual_encoder{suffix}."))
    out.update(prefixed("text.", _token_types(lavis_text(ckpt, bert), token_types)))
    if mlm_head:
        out.update(prefixed("mlm_head.", lavis_lm_head(ckpt, text + "cls.predictions.",
                                                   bert + "embeddings.word_embeddings.weight")))
    for name in ("vision_proj", "text_proj"):
        out.update(prefixed(f"{name}.", lavis_linear(ckpt, name + suffix)))
    return out


def _albef(ckpt: LavisCheckpoint, token_types: str, queues: bool, mlm_head: bool) -> dict[str, torch.Tensor]:
    model = _albef_encoders(ckpt, "", token_types, mlm_head)
    has_momentum = any(ckpt.has(f"{name}_m.") for name in ("visual_encoder", "text_encoder", "vision_proj",
                                                             "text_proj"))
    momentum = _albef_encoders(ckpt, "_m", token_types, mlm_head) if has_momentum else dict(model)
    out = {**prefixed("model.", model), **prefixed("momentum_model.", momentum)}
    out.update(prefixed("itm_head.", lavis_linear(ckpt, "itm_head")))
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
    """LAVIS `albef_pretrain` (or original ALBEF's ALBEF.pth) -> vlforge.models.albef.model.ALBEF.

    The momentum encoders (`*_m`) become `momentum_model.*` and `momentum_ready` is set, so training
    continues from them instead of re-copying the model. A checkpoint without any momentum keys gets
    copies of the online weights and `momentum_ready` false: what LAVIS's `copy_params` does at build.
    `queues=False` leaves the feature queues out (for a model with another `queue_size`); then load
    with `ignore=("image_queue", "text_queue", "queue_ptr")`. `token_types`: see `_token_types`.
    """
    ckpt = LavisCheckpoint(state_dict)
    return check_all_mapped(ckpt, _albef(ckpt, token_types, queues, mlm_head=True))


def albef_retrieval_from_lavis(state_dict: Mapping[str, torch.Tensor], token_types: str = "fold",
                               queues: bool = True) -> dict[str, torch.Tensor]:
    """LAVIS `albef_retrieval` (albef_coco_retrieval_lavis.pt; original ALBEF's mscoco.pth, as its
    model_retrieval.py builds it, has the same layout) -> vlforge.models.albef.model.ALBEF, all but the MLM heads.

    The retrieval model's text encoder is a BertModel (`text_encoder.*`, `text_encoder_m.*`), with no
    MLM head: the result has no `model.mlm_head.*` / `momentum_model.mlm_head.*` keys, so load it with
    those ignored (they keep their initialisation; `decoder.weight` is the word embedding matrix, tied,
    and so holds the checkpoint's). A model built with `mlm: false`, as the retrieval recipe is,
    never runs the head. `token_types` and `queues`: see `albef_from_lavis`.
    """
    ckpt = LavisCheckpoint(state_dict)
    out = _albef(ckpt, token_types, queues, mlm_head=False)
    # LAVIS's `idx_queue` holds the image ids of the queued features (its ITC counts queued captions of
    # the batch's images as positives). vlforge's ALBEF has no image-id queue: its `group_queue`
    # (match_identical_texts) ids texts by their wording, which image ids do not translate to. The
    # queued features load; without their ids they are negatives, as vlforge's ALBEF treats its own.
    ckpt.ignore(("idx_queue",))
    return check_all_mapped(ckpt, out)


# LAVIS's momentum copies, the distillation targets of its finetunes.
_MOMENTUM = ("visual_encoder_m", "text_encoder_m", "text_decoder_m", "vision_proj_m", "text_proj_m")


def albef_vqa_from_lavis(state_dict: Mapping[str, torch.Tensor], token_types: str = "fold") -> dict[str, torch.Tensor]:
    """LAVIS `albef_vqa` (albef_vqav2_lavis.pt) -> vlforge.models.blip.vqa.BlipVQA as the albef_vqa
    recipe builds it (`fusion_layer`, `decoder_layers`): image tower, question encoder (`text_encoder.*`,
    a BertModel), answer decoder (`text_decoder.bert.*`) and its LM head.

    The momentum copies (`*_m`) are the distillation targets of LAVIS's VQA finetuning; answering
    reads only the online model, and vlforge's VQA finetunes without distillation: ignored.
    `token_types`: see `_token_types`."""
    ckpt = LavisCheckpoint(state_dict)
    out = prefixed("vision.", lavis_vision(ckpt))
    out.update(prefixed("text_encoder.", _token_types(lavis_text(ckpt, "text_encoder."), token_types)))
    out.update(prefixed("text_decoder.", _token_types(lavis_text(ckpt, "text_decoder.bert."), token_types)))
    out.update(prefixed("lm_head.", lavis_lm_head(ckpt, "text_decoder.cls.predictions.",
                                              "text_decoder.bert.embeddings.word_embeddings.weight")))
    ckpt.ignore(_MOMENTUM)
    return check_all_mapped(ckpt, out)


def albef_feature_extractor_from_lavis(state_dict: Mapping[str, torch.Tensor],
                                       token_types: str = "fold") -> dict[str, torch.Tensor]:
    """LAVIS `albef_feature_extractor` -> vlforge.models.albef.model.ALBEF's encoders, projections and
    temperature, the momentum copies set to the online weights (load with the ITM head and the queues
    ignored: they keep their initialisation).

    LAVIS builds its feature extractor from ALBEF's pretraining checkpoint (ALBEF.pth) and loads it
    non-strictly, so the ITM head, momentum encoders and queues that file holds are unused: ignored
    here. The text encoder is a BertForMaskedLM, whose MLM head maps too."""
    ckpt = LavisCheckpoint(state_dict)
    model = _albef_encoders(ckpt, "", token_types, mlm_head=True)
    ckpt.ignore(("itm_head", *_MOMENTUM, "image_queue", "text_queue", "queue_ptr", "idx_queue"))
    out = {**prefixed("model.", model), **prefixed("momentum_model.", model)}
    out["logit_scale.log_scale"] = log_scale_from_temperature(ckpt.get("temp"))
    return check_all_mapped(ckpt, out)


def albef_classification_from_lavis(state_dict: Mapping[str, torch.Tensor],
                                    token_types: str = "fold") -> dict[str, torch.Tensor]:
    """LAVIS `albef_classification` (albef_snli_ve_lavis.pt) -> vlforge.models.albef.classification.
    AlbefClassification: image tower, text encoder with fusion (`text_encoder.*`, a BertModel) and the
    MLP head (`cls_head.0`, `cls_head.2`). The momentum copies (`*_m`) are the distillation targets
    of LAVIS's finetuning, which vlforge's does not use: ignored. `token_types`: see `_token_types`."""
    ckpt = LavisCheckpoint(state_dict)
    out = prefixed("vision.", lavis_vision(ckpt))
    out.update(prefixed("text.", _token_types(lavis_text(ckpt, "text_encoder."), token_types)))
    for layer in ("0", "2"):
        out.update(prefixed(f"cls_head.{layer}.", lavis_linear(ckpt, f"cls_head.{layer}")))
    ckpt.ignore(("visual_encoder_m", "text_encoder_m", "cls_head_m"))
    return check_all_mapped(ckpt, out)
