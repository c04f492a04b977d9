"""One tiny random BLIP configuration, built by transformers and by vlforge, for the parity tests."""
from __future__ import annotations

import torch
from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

from vlforge.models.towers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

VOCAB, BOS, SEP, PAD = 64, 1, 2, 0
IMAGE, PATCH, WIDTH = 32, 8, 32

# The same architecture in vlforge's terms (timm ViT + BertTextModel arguments).
VISION = dict(name="vit_base_patch16_224", img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=2, num_heads=4,
              mlp_ratio=48 / WIDTH, norm_eps=1e-5)
TEXT = dict(vocab_size=VOCAB, width=WIDTH, layers=2, heads=4, intermediate=40, max_len=40)


def hf_config(**extra: object) -> BlipConfig:
    vision = BlipVisionConfig(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH)
    text = BlipTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, encoder_hidden_size=WIDTH, intermediate_size=40,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, bos_token_id=BOS,
                          sep_token_id=SEP, eos_token_id=SEP, pad_token_id=PAD, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    return BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **extra)


def images(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 pixels for vlforge, the same normalised for transformers)."""
    pixels = torch.randint(0, 256, (batch, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return pixels, (pixels.float() / 255.0 - mean) / std
