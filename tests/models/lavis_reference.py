"""Reference modules with LAVIS's parameter names, for the LAVIS conversion tests.

A tiny timm ViT (LAVIS's vit.py is timm's VisionTransformer, LayerNorm eps 1e-6) for `visual_encoder.`,
and transformers' BLIP text models (ported from BLIP's med.py, the file LAVIS uses, with the same
parameter names) for `text_encoder.` / `text_encoder.bert.` / `text_decoder.bert.` and
`*.cls.predictions.`. Every reference parameter gets random noise, so that LayerNorms and biases are
not at their (easily confused) initial values.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from tests.models.perturb import noisy

VOCAB, MAXLEN, EMBED, QUEUE, FUSION, TEXT_LAYERS = 64, 40, 16, 8, 2, 4
VISION_WIDTH, TEXT_WIDTH = 32, 48  # different, so a cross-attention built with the wrong width cannot load
VIT = dict(img_size=32, patch_size=8, embed_dim=VISION_WIDTH, depth=2, num_heads=4, mlp_ratio=1.5)
VISION = dict(name="vit_base_patch16_224", **VIT)  # no norm_eps: timm's 1e-6, as LAVIS's ViT
TEXT = dict(vocab_size=VOCAB, width=TEXT_WIDTH, layers=TEXT_LAYERS, heads=4, intermediate=40, max_len=MAXLEN)
TOL = dict(rtol=1e-4, atol=1e-4)


def make_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return noisy(timm.create_model("vit_base_patch16_224", num_classes=0, **VIT), seed)


def text_config(encoder_width: int, layers: int = TEXT_LAYERS) -> BlipTextConfig:
    # is_decoder only makes transformers build cross-attention in every layer; the forward decides causality.
    return BlipTextConfig(vocab_size=VOCAB, hidden_size=TEXT_WIDTH, encoder_hidden_size=encoder_width,
                          intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4,
                          max_position_embeddings=MAXLEN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          is_decoder=True)


def make_encoder(seed: int, encoder_width: int = VISION_WIDTH, layers: int = TEXT_LAYERS) -> BlipTextModel:
    torch.manual_seed(seed)
    return noisy(BlipTextModel(text_config(encoder_width, layers), add_pooling_layer=False), seed)


def make_decoder(seed: int, encoder_width: int = VISION_WIDTH, layers: int = TEXT_LAYERS) -> BlipTextLMHeadModel:
    torch.manual_seed(seed)
    return noisy(BlipTextLMHeadModel(text_config(encoder_width, layers)), seed)


def make_linear(fan_in: int, fan_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out).eval()


def under_prefix(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict under `prefix`, plus med.py's saved `position_ids` buffer for BERTs."""
    out = {prefix + k: v.clone() for k, v in module.state_dict().items()}
    for key in list(out):
        if key.endswith("embeddings.word_embeddings.weight"):
            out[key.replace("word_embeddings.weight", "position_ids")] = torch.arange(MAXLEN)[None]
    return out


def text_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 7, 8, 9, 10, 11, 2], [1, 12, 13, 2, 0, 0, 0]])
    return ids, (ids != 0).long()


def run_layers(layers, hidden: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """med.py's encoder loop: bidirectional self-attention with its additive mask, cross-attention
    to `image` when given."""
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for layer in layers:
        hidden = layer(hidden, encoder_hidden_states=image, attention_mask=extended)
    return hidden


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, **TOL)


def apply_linear(state_dict: dict[str, torch.Tensor], linear: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state_dict[f"{linear}.weight"], state_dict[f"{linear}.bias"])
