"""Each fusion switch builds, behaves as specified, and trains."""
from __future__ import annotations

import pytest
import torch

from vlforge.models.fusion.cross_attention import FusionBlock
from vlforge.models.fusion.itm import FusionITM
from vlforge.models.towers.multiscale import MultiScaleVisionTower

VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
TEXT = dict(vocab_size=40, width=32, layers=2, heads=4, max_len=8)


def _toy_batch() -> dict[str, torch.Tensor]:
    """Eight images, each a flat colour; its caption names the colour (token 5 + colour index)."""
    gen = torch.Generator().manual_seed(0)
    colours = torch.arange(8)
    images = (colours.view(8, 1, 1, 1) * 30 + torch.zeros(8, 3, 32, 32)).to(torch.uint8)
    images = images + torch.randint(0, 5, images.shape, generator=gen, dtype=torch.uint8)
    ids = torch.stack([torch.tensor([2, 5 + int(c), 3]) for c in colours])
    return {"image": images, "text_input_ids": ids, "text_attention_mask": torch.ones_like(ids)}


VARIANTS = {
    "cross_pre": dict(kind="cross", norm="pre"),
    "cross_post": dict(kind="cross", norm="post"),
    "gated": dict(kind="gated", norm="pre"),
    "every_second_layer": dict(kind="cross", every=2),
}


@pytest.mark.parametrize("name", [*VARIANTS, "hierarchical"])
def test_each_fusion_variant_trains(name: str) -> None:
    torch.manual_seed(0)
    if name == "hierarchical":
        model = FusionITM(dict(VIT, layers=[1, 2], width=32), TEXT, dict(hierarchical=True))
    else:
        model = FusionITM(VIT, TEXT, VARIANTS[name])
    batch = _toy_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(300):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Chance is ln 2 = 0.693: telling matching from mismatched pairs needs the image through the fusion.
    assert min(losses) < 0.2 and losses[-1] < losses[0], (name, losses[::50])


def test_no_residual_variant_reads_both_modalities() -> None:
    # Without the skip, text reaches the output only through the attention queries, so on flat-colour
    # images (identical tokens) it cannot learn the toy task; check that it runs and reads both inputs.
    torch.manual_seed(0)
    model = FusionITM(VIT, TEXT, dict(residual=False))
    batch = _toy_batch()
    model(batch).loss.backward()
    assert model.vision.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text.token_embedding.weight.grad.abs().sum() > 0
    image = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    context = model.image_context(image)
    a = model.itm_logits(context, torch.tensor([[2, 5, 3], [2, 5, 3]]), torch.ones(2, 3, dtype=torch.long))
    b = model.itm_logits(context, torch.tensor([[2, 9, 3], [2, 9, 3]]), torch.ones(2, 3, dtype=torch.long))
    assert not torch.allclose(a, b)


def test_gated_block_starts_as_identity_and_opens() -> None:
    block = FusionBlock(16, 8, heads=2, kind="gated")
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    torch.testing.assert_close(block(x, context), x)
    block(x, context).sum().backward()
    assert block.gates.grad is not None and block.gates.grad.abs().sum() > 0


def test_post_norm_output_is_normalised() -> None:
    block = FusionBlock(16, 8, heads=2, norm="post")
    out = block(torch.randn(2, 5, 16) * 10, torch.randn(2, 3, 8))
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_hierarchical_fusion_reads_one_scale_per_depth() -> None:
    model = FusionITM(dict(VIT, layers=[0, 2], width=32), dict(TEXT, layers=4), dict(hierarchical=True))
    assert [model.text._scale_for(i, 2) for i in range(4)] == [0, 0, 1, 1]
    flat = FusionITM(VIT, dict(TEXT, layers=4))
    assert [flat.text._scale_for(i, 1) for i in range(4)] == [0, 0, 0, 0]


def test_feature_pyramid_gives_one_width_per_scale() -> None:
    tower = MultiScaleVisionTower("resnet18", layers=[2, 3, 4], width=24)
    scales = tower(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert [s.shape for s in scales] == [(2, 64, 24), (2, 16, 24), (2, 4, 24)]


def test_invalid_switches_are_named() -> None:
    with pytest.raises(ValueError, match="kind"):
        FusionBlock(16, 8, 2, kind="sum")
    with pytest.raises(ValueError, match="norm"):
        FusionBlock(16, 8, 2, norm="middle")

