"""LAVIS ALBEF checkpoints: every key accounted for, the same outputs as the reference modules.

ALBEF's text encoder has cross-attention only from `fusion_layer` on, so the reference runs the layers
itself (text-only below, cross-attending above) and the checkpoint leaves out the lower layers'
cross-attention keys.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models.lavis_reference import (
    EMBED,
    FUSION,
    QUEUE,
    TEXT,
    TEXT_WIDTH,
    VISION,
    VISION_WIDTH,
    assert_close,
    make_decoder,
    make_linear,
    make_vit,
    run_layers,
    text_inputs,
    under_prefix,
)
from tests.models.tiny_blip import images
from vlforge.models.albef.convert import albef_from_lavis
from vlforge.models.albef.model import ALBEF
from vlforge.models.layers.convert import load_mapped
from vlforge.models.layers.lavis import log_scale_from_temperature


def _albef_parts(seed: int) -> dict[str, nn.Module]:
    return {"visual_encoder": make_vit(seed), "text_encoder": make_decoder(seed + 1),
            "vision_proj": make_linear(VISION_WIDTH, EMBED, seed + 2), "text_proj": make_linear(TEXT_WIDTH, EMBED, seed + 3)}


def _albef_state_dict(parts: dict[str, nn.Module], suffix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        out.update(under_prefix(f"{name}{suffix}.", module))
    # LAVIS's ALBEF builds cross-attention only in layers >= fusion_layer.
    return {k: v for k, v in out.items()
            if not any(f".layer.{i}.crossattention." in k for i in range(FUSION))}


@pytest.fixture(scope="module")
def albef() -> dict:
    online, momentum = _albef_parts(10), _albef_parts(20)
    itm = make_linear(TEXT_WIDTH, 2, 30)
    lavis = {**_albef_state_dict(online), **_albef_state_dict(momentum, "_m"), **under_prefix("itm_head.", itm),
             "temp": torch.tensor(0.0537),
             "image_queue": F.normalize(torch.randn(EMBED, QUEUE), dim=0),
             "text_queue": F.normalize(torch.randn(EMBED, QUEUE), dim=0), "queue_ptr": torch.tensor([4])}
    torch.manual_seed(0)
    ours = ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE).eval()
    load_mapped(ours, albef_from_lavis(lavis))
    return {"lavis": lavis, "online": online, "momentum": momentum, "itm": itm, "ours": ours}


def _albef_reference(parts: dict[str, nn.Module], normalised: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    tokens = parts["visual_encoder"].forward_features(normalised)
    image_feat = F.normalize(parts["vision_proj"](tokens[:, 0]), dim=-1)
    bert = parts["text_encoder"].bert
    text = run_layers(bert.encoder.layer[:FUSION], bert.embeddings(input_ids=ids), mask, None)
    text_feat = F.normalize(parts["text_proj"](text[:, 0]), dim=-1)
    fused = run_layers(bert.encoder.layer[FUSION:], text, mask, tokens)
    return tokens, image_feat, text, text_feat, fused, parts["text_encoder"].cls(fused)


def _albef_ours(encoders, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    tokens, image_feat = encoders.image(pixels)
    text, text_feat = encoders.text_only(ids, mask)
    fused = encoders.fuse(text, mask, tokens)
    return tokens, image_feat, text, text_feat, fused, encoders.mlm_head(fused)


def albef_max_differences(albef: dict) -> dict[str, float]:
    """Largest |ours - reference| per output, for the online and the momentum encoders."""
    pixels, normalised = images(2, seed=5)
    ids, mask = text_inputs()
    keep = mask.bool()
    names = ("image_tokens", "image_feat", "text_hidden", "text_feat", "fused_hidden", "mlm_logits")
    out = {}
    with torch.no_grad():
        for label, encoders, parts in (("", albef["ours"].model, albef["online"]),
                                       ("momentum_", albef["ours"].momentum_model, albef["momentum"])):
            for name, got, expected in zip(names, _albef_ours(encoders, pixels, ids, mask),
                                           _albef_reference(parts, normalised, ids, mask)):
                if name in ("text_hidden", "fused_hidden", "mlm_logits"):
                    got, expected = got[keep], expected[keep]  # padded query rows are undefined
                out[label + name] = (got - expected).abs().max().item()
        fused = _albef_reference(albef["online"], normalised, ids, mask)[4]
        out["itm_logits"] = (albef["ours"].itm_head(fused[:, 0]) - albef["itm"](fused[:, 0])).abs().max().item()
    return out


def test_albef_outputs_match_reference_modules(albef) -> None:
    differences = albef_max_differences(albef)
    assert len(differences) == 13
    assert max(differences.values()) < 1e-4, differences


def test_albef_temperature_queues_and_momentum_state(albef) -> None:
    ours, lavis = albef["ours"], albef["lavis"]
    temp = lavis["temp"]
    assert ours.logit_scale.log_scale.shape == (1,)
    assert ours.logit_scale.log_scale.item() == (-torch.log(temp.double())).float().item()
    torch.testing.assert_close(ours.logit_scale().double(), 1.0 / temp.double(), rtol=1e-6, atol=0.0)
    assert torch.equal(ours.image_queue, lavis["image_queue"]) and torch.equal(ours.text_queue, lavis["text_queue"])
    assert ours.queue_ptr.item() == 4 and bool(ours.momentum_ready)  # the momentum weights are kept, not re-copied
    assert torch.equal(ours.momentum_model.text_proj.weight, lavis["text_proj_m.weight"])


def test_temperature_converts_exactly() -> None:
    for value in (0.07, 0.0537, 0.5, 0.001):
        temp = torch.tensor(value)
        log_scale = log_scale_from_temperature(temp)
        assert log_scale.shape == (1,) and log_scale.dtype == torch.float32
        assert log_scale.item() == (-torch.log(temp.double())).float().item()
    with pytest.raises(ValueError, match="positive"):
        log_scale_from_temperature(torch.tensor(0.0))


@pytest.mark.parametrize("key", [
    "text_encoder.bert.encoder.layer.0.attention.self.mystery.weight",
    "visual_encoder.head.weight",
    "text_encoder.cls.predictions.extra",
    "prompt_embeddings",
])
def test_albef_unknown_key_is_named(albef, key: str) -> None:
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        albef_from_lavis({**albef["lavis"], key: torch.zeros(1)})


@pytest.mark.parametrize("key", [
    "temp", "itm_head.bias", "text_proj_m.weight", "image_queue",
    "text_encoder.bert.encoder.layer.1.attention.self.key.bias",
    "text_encoder_m.cls.predictions.transform.LayerNorm.weight",
])
def test_albef_missing_key_is_named(albef, key: str) -> None:
    lavis = {k: v for k, v in albef["lavis"].items() if k != key}
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        albef_from_lavis(lavis)


def test_albef_missing_weight_is_named_by_load_mapped(albef) -> None:
    lavis = {k: v for k, v in albef["lavis"].items() if k != "visual_encoder.blocks.1.norm2.weight"}
    with pytest.raises(KeyError, match=r"missing \['model\.vision\.backbone\.blocks\.1\.norm2\.weight'\]"):
        load_mapped(albef["ours"], albef_from_lavis(lavis))


def test_albef_cross_attention_below_fusion_layer_is_refused(albef) -> None:
    extra = {f"text_encoder.bert.encoder.layer.0.crossattention.{k}": v for k, v in
             albef["online"]["text_encoder"].bert.encoder.layer[0].crossattention.state_dict().items()}
    with pytest.raises(KeyError, match=r"model\.text\.layers\.0\.cross_attention\.query\.weight"):
        load_mapped(albef["ours"], albef_from_lavis({**albef["lavis"], **extra}))


def test_albef_untied_mlm_decoder_is_refused(albef) -> None:
    key = "text_encoder.cls.predictions.decoder.weight"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        albef_from_lavis({**albef["lavis"], key: albef["lavis"][key] + 1.0})


def test_albef_token_type_embeddings_fold_into_positions(albef) -> None:
    """Original ALBEF adds token type 0's embedding to every token: folding it into the position
    embeddings gives what a model that keeps the table computes; "drop" is LAVIS's behaviour."""
    table = torch.randn(2, TEXT_WIDTH, generator=torch.Generator().manual_seed(7))
    lavis = {**albef["lavis"], "text_encoder.bert.embeddings.token_type_embeddings.weight": table,
             "text_encoder_m.bert.embeddings.token_type_embeddings.weight": table}
    kept = ALBEF(VISION, {**TEXT, "type_vocab_size": 2}, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE).eval()
    load_mapped(kept, albef_from_lavis(lavis, token_types="keep"))
    folded = ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE).eval()
    load_mapped(folded, albef_from_lavis(lavis))
    dropped = albef_from_lavis(lavis, token_types="drop")
    ids, mask = text_inputs()
    with torch.no_grad():
        assert_close(folded.model.text_only(ids, mask)[0], kept.model.text_only(ids, mask)[0])
    assert torch.equal(dropped["model.text.position_embeddings.weight"],
                       lavis["text_encoder.bert.embeddings.position_embeddings.weight"])


def test_albef_without_momentum_keys_starts_momentum_from_a_copy(albef) -> None:
    lavis = {k: v for k, v in albef["lavis"].items() if "_m." not in k}
    converted = albef_from_lavis(lavis)
    assert not bool(converted["momentum_ready"])
    assert torch.equal(converted["momentum_model.text_proj.weight"], lavis["text_proj.weight"])
    load_mapped(ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=QUEUE), converted)


def test_albef_queues_can_be_left_out(albef) -> None:
    ours = ALBEF(VISION, TEXT, embed_dim=EMBED, fusion_layer=FUSION, queue_size=2 * QUEUE)
    load_mapped(ours, albef_from_lavis(albef["lavis"], queues=False), ignore=("image_queue", "text_queue", "queue_ptr"))
    assert ours.image_queue.shape == (EMBED, 2 * QUEUE)
