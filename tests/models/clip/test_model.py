"""CLIP: the contrastive loss (single- and multi-process), a tiny model's forward/backward and features.

Module-level imports stay light (torch only): the 2-process test spawns workers that import this module.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.gloo import run_on_ranks
from vlforge.models.layers.contrastive import contrastive_loss, gather_with_grad, text_groups

VISION = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TEXT = dict(vocab_size=100, width=64, layers=2, heads=2, max_len=16)


def _reference_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy written out: -log softmax of the diagonal, over rows and over columns."""
    logits = scale * image @ text.t()
    n = logits.shape[0]
    idx = torch.arange(n)
    image_to_text = -(logits.log_softmax(dim=1)[idx, idx]).mean()
    text_to_image = -(logits.log_softmax(dim=0)[idx, idx]).mean()
    return 0.5 * (image_to_text + text_to_image)


def _embeddings(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(10.0, dtype=torch.float64)


# --- contrastive loss, one process ------------------------------------------------------------------


def test_contrastive_loss_is_symmetric_cross_entropy():
    image, text, scale = _embeddings(6)
    loss = contrastive_loss(image, text, scale)
    assert loss.shape == ()
    torch.testing.assert_close(loss, _reference_loss(image, text, scale))
    # Symmetric in its two inputs.
    torch.testing.assert_close(contrastive_loss(text, image, scale), loss)


def test_contrastive_loss_rewards_alignment():
    image, text, scale = _embeddings(4)
    aligned = contrastive_loss(image, image, scale)
    assert aligned < contrastive_loss(image, text, scale)
    assert aligned < contrastive_loss(image, image.roll(1, dims=0), scale)


def test_identical_texts_are_positives_of_each_others_images():
    image, text, scale = _embeddings(5)
    distinct = torch.arange(5)
    plain = contrastive_loss(image, text, scale)
    torch.testing.assert_close(contrastive_loss(image, text, scale, distinct), plain.float())  # scored in fp32
    groups = torch.tensor([7, 3, 7, 1, 3])  # texts 0 and 2 read alike, as do 1 and 4
    same = (groups[:, None] == groups[None, :]).double()
    logits = scale * image @ text.t()
    # Written out: the target of each row spread evenly over the columns of its group.
    i2t = -((logits.log_softmax(dim=1) * same).sum(1) / same.sum(1)).mean()
    t2i = -((logits.t().log_softmax(dim=1) * same).sum(1) / same.sum(1)).mean()
    torch.testing.assert_close(contrastive_loss(image, text, scale, groups), (0.5 * (i2t + t2i)).float())


def test_text_groups_ignore_padding_and_tell_texts_apart():
    ids = torch.tensor([[2, 11, 12, 3, 0, 0], [2, 11, 12, 3, 0, 0], [2, 11, 13, 3, 0, 0], [2, 12, 11, 3, 0, 0]])
    mask = (ids != 0).long()
    groups = text_groups(ids, mask)
    assert groups[0] == groups[1] and len(set(groups[1:].tolist())) == 3
    # The same text padded to another length (another rank's batch) keeps its group.
    longer = torch.cat([ids, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    assert text_groups(longer, (longer != 0).long()).tolist() == groups.tolist()


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


# --- contrastive loss, two processes (gloo) ---------------------------------------------------------


def _dist_worker(rank: int, world: int, image, text, scale, groups, out_dir: str) -> None:
    rows = image.shape[0] // world
    local = slice(rank * rows, (rank + 1) * rows)
    img = image[local].clone().requires_grad_(True)
    txt = text[local].clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    gathered = gather_with_grad(img)
    loss = contrastive_loss(img, txt, s, None if groups is None else groups[local])
    loss.backward()
    torch.save({"gathered": gathered.detach(), "loss": loss.detach(), "image_grad": img.grad, "text_grad": txt.grad,
                "scale_grad": s.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("groups", [None, torch.tensor([0, 1, 2, 0, 4, 1, 6, 7])], ids=["plain", "identical-texts"])
def test_contrastive_loss_two_ranks_matches_one(tmp_path, groups):
    world = 2
    image, text, scale = _embeddings(8, seed=1)
    # With groups, texts alike sit on both ranks (0 and 3, 1 and 5): the targets span ranks.
    run_on_ranks(world, _dist_worker, image, text, scale, groups, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # One process, the whole batch.
    img = image.clone().requires_grad_(True)
    txt = text.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    full = contrastive_loss(img, txt, s, groups)
    full.backward()

    for r in results:
        torch.testing.assert_close(r["gathered"], image)  # all ranks' rows in rank order
    # Each rank's loss is the mean over its own rows; averaging over ranks gives the global mean.
    torch.testing.assert_close(sum(r["loss"] for r in results) / world, full.detach(), atol=1e-5, rtol=0)
    # Each rank's input gradient sums every rank's loss over its rows (the all-reduce in backward);
    # averaged over ranks, as DeepSpeed does with parameter gradients, it is the full-batch gradient.
    rows = image.shape[0] // world
    for rank, r in enumerate(results):
        local = slice(rank * rows, (rank + 1) * rows)
        torch.testing.assert_close(r["image_grad"] / world, img.grad[local], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["text_grad"] / world, txt.grad[local], atol=1e-5, rtol=0)
    torch.testing.assert_close(sum(r["scale_grad"] for r in results) / world, s.grad, atol=1e-5, rtol=0)


# --- CLIP -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    from vlforge.models.clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(vision=VISION, text=TEXT, embed_dim=32)


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 16), generator=gen)
    mask = torch.ones(n, 16, dtype=torch.long)
    for row, length in enumerate([16, 10, 5, 12][:n]):
        ids[row, length:] = 0
        mask[row, length:] = 0
    return {
        "image": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
        "text_input_ids": ids,
        "text_attention_mask": mask,
    }


def test_clip_forward_backward(clip):
    clip.train()
    clip.zero_grad(set_to_none=True)
    out = clip(_batch())
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert set(out.losses) == {"itc"} and not out.losses["itc"].requires_grad
    torch.testing.assert_close(out.extras["logit_scale"], torch.tensor(1 / 0.07))
    out.loss.backward()
    missing = [name for name, p in clip.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [name for name, p in clip.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    assert clip.logit_scale.log_scale.grad.abs().sum() > 0
    clip.zero_grad(set_to_none=True)


def test_clip_logit_scale_is_clamped():
    from vlforge.models.clip.model import CLIP

    model = CLIP(vision=VISION, text=TEXT, embed_dim=32, init_temperature=0.001, max_logit_scale=50.0)
    out = model(_batch())
    torch.testing.assert_close(out.extras["logit_scale"], torch.tensor(50.0))


@pytest.mark.parametrize("mode, keys", [("image", {"image_embeds"}), ("text", {"text_embeds"}),
                                        ("multimodal", {"image_embeds", "text_embeds"})])
def test_extract_features_unit_norm(clip, mode, keys):
    clip.eval()
    feats = clip.extract_features(_batch(), mode=mode)
    assert set(feats) == keys
    for value in feats.values():
        assert value.shape == (4, 32) and not value.requires_grad
        torch.testing.assert_close(value.norm(dim=-1), torch.ones(4))


def test_extract_features_matches_forward_embeddings(clip):
    clip.eval()
    batch = _batch()
    feats = clip.extract_features(batch)
    with torch.no_grad():
        torch.testing.assert_close(feats["image_embeds"], clip.encode_image(batch["image"]))


def test_extract_features_rejects_bad_mode(clip):
    with pytest.raises(ValueError, match="mode"):
        clip.extract_features(_batch(), mode="audio")


# --- TextTransformer pooling ------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["last", "cls"])
def test_text_pooling_ignores_padding(pool):
    from vlforge.models.layers.transformer import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(**TEXT, pool=pool).eval()
    batch = _batch()
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
    with torch.no_grad():
        pooled, tokens = tower(ids, mask)
        changed = ids.clone()
        changed[1, 12] = 57  # row 1 has 10 real tokens: position 12 is padding
        changed[2, 15] = 33  # row 2 has 5
        pooled_changed, _ = tower(changed, mask)
    torch.testing.assert_close(pooled_changed, pooled)
    if pool == "last":
        lengths = mask.sum(dim=1)
        torch.testing.assert_close(pooled, tokens[torch.arange(4), lengths - 1])
        assert lengths.tolist() == [16, 10, 5, 12]
    else:
        torch.testing.assert_close(pooled, tokens[:, 0])


def test_text_pool_last_reads_the_last_real_token():
    from vlforge.models.layers.transformer import TextTransformer

    torch.manual_seed(0)
    tower = TextTransformer(**TEXT, pool="last").eval()
    batch = _batch()
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
    with torch.no_grad():
        pooled, _ = tower(ids, mask)
        changed = ids.clone()
        changed[1, 9] = 1 if ids[1, 9] != 1 else 2  # row 1 has 10 real tokens: position 9 is its last
        pooled_changed, _ = tower(changed, mask)
    assert not torch.allclose(pooled_changed[1], pooled[1])
    torch.testing.assert_close(pooled_changed[[0, 2, 3]], pooled[[0, 2, 3]])


def test_text_rejects_too_long_input():
    from vlforge.models.layers.transformer import TextTransformer

    tower = TextTransformer(**TEXT)
    with pytest.raises(ValueError, match="max_len"):
        tower(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.long))


def _softmax_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """Attention as softmax over the allowed keys: a query with none gets NaN, as older torch and some
    GPU kernels give (torch 2.14's CPU kernels give zeros instead)."""
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


@pytest.mark.parametrize("pool", ["last", "cls"])
def test_a_row_of_padding_only_gives_a_finite_output_and_leaves_the_other_rows_alone(pool, monkeypatch):
    from vlforge.models.layers.transformer import TextTransformer

    monkeypatch.setattr(F, "scaled_dot_product_attention", _softmax_attention)
    torch.manual_seed(0)
    tower = TextTransformer(**TEXT, pool=pool).eval()
    batch = _batch()
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"].clone()
    with torch.no_grad():
        before, _ = tower(ids, mask)
        mask[2] = 0  # an empty text: every position padding
        pooled, tokens = tower(ids, mask)
    assert torch.isfinite(pooled).all() and torch.isfinite(tokens).all()
    rows = [0, 1, 3]
    torch.testing.assert_close(pooled[rows], before[rows], rtol=0, atol=1e-6)
