"""CLIP loaded from an open_clip state dict: same image and text embeddings, same logits."""
from __future__ import annotations

import pytest
import torch

from tests.models.perturb import noisy
from vlforge.models.clip.convert import clip_from_open_clip
from vlforge.models.clip.model import CLIP
from vlforge.models.layers.convert import load_mapped
from vlforge.models.towers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

open_clip = pytest.importorskip("open_clip")

VOCAB, CONTEXT, WIDTH, EMBED, IMAGE, PATCH = 64, 12, 32, 16, 32, 8


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])  # quick_gelu: OpenAI's weights
def test_open_clip_vit_parity(act: str) -> None:
    torch.manual_seed(0)
    reference = noisy(open_clip.CLIP(
        embed_dim=EMBED,
        vision_cfg=dict(image_size=IMAGE, layers=2, width=WIDTH, patch_size=PATCH, head_width=8),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=4, layers=2),
        quick_gelu=act == "quick_gelu",
    ), seed=0)
    ours = CLIP(
        vision=dict(name="vit_base_patch16_clip_224", img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=2,
                    num_heads=4, act_layer=act),
        text=dict(vocab_size=VOCAB, width=WIDTH, layers=2, heads=4, max_len=CONTEXT, pool="last", act=act),
        embed_dim=EMBED,
    ).eval()
    load_mapped(ours, clip_from_open_clip(reference.state_dict()))

    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (3, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=gen)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    # OpenAI-style tokens: start, words, and the end token (the largest id, where open_clip pools).
    ids = torch.zeros(3, CONTEXT, dtype=torch.long)
    for row, length in enumerate((5, 8, 12)):
        ids[row, 0] = VOCAB - 2
        ids[row, 1 : length - 1] = torch.randint(1, VOCAB - 2, (length - 2,), generator=gen)
        ids[row, length - 1] = VOCAB - 1
    mask = (ids != 0).long()
    with torch.no_grad():
        image_ref = reference.encode_image((pixels.float() / 255 - mean) / std, normalize=True)
        text_ref = reference.encode_text(ids, normalize=True)
        feats = ours.extract_features({"image": pixels, "text_input_ids": ids, "text_attention_mask": mask})
    torch.testing.assert_close(feats["image_embeds"], image_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["text_embeds"], text_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.logit_scale(), reference.logit_scale.exp(), rtol=1e-6, atol=1e-6)
