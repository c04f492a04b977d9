"""SigLIP: the pairwise sigmoid loss by value, exact across two ranks, and a tiny model's training step
and features.

Module-level imports stay light (torch only): the 2-process test spawns workers that import this module.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.gloo import run_on_ranks
from vlforge.models.siglip.loss import sigmoid_loss

VISION = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TEXT = dict(vocab_size=100, width=64, layers=2, heads=2, max_len=16)


def _embeddings(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    return image, text


def _by_hand(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float, positive: torch.Tensor) -> float:
    """-(1/B) sum_ij log sigmoid(z_ij (scale <x_i, y_j> + bias)), one pair at a time."""
    total = 0.0
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            z = 1.0 if positive[i, j] else -1.0
            logit = scale * float(image[i] @ text[j]) + bias
            total -= math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / image.shape[0]


def test_sigmoid_loss_is_the_mean_over_images_of_every_pairs_log_sigmoid() -> None:
    image, text = _embeddings(5, seed=3)
    loss = sigmoid_loss(image, text, torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64))
    assert loss.item() == pytest.approx(_by_hand(image, text, 7.0, -2.5, torch.eye(5, dtype=torch.bool)), rel=1e-12)


def test_identical_texts_are_matching_pairs_of_each_others_images() -> None:
    image, text = _embeddings(4, seed=4)
    groups = torch.tensor([0, 1, 0, 3])
    positive = groups[:, None] == groups[None, :]
    loss = sigmoid_loss(image, text, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64),
                        groups)
    assert loss.item() == pytest.approx(_by_hand(image, text, 10.0, -10.0, positive), rel=1e-12)


def _dist_worker(rank: int, world: int, image, text, groups, out_dir: str) -> None:
    rows = image.shape[0] // world
    local = slice(rank * rows, (rank + 1) * rows)
    img = image[local].clone().requires_grad_(True)
    txt = text[local].clone().requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    loss = sigmoid_loss(img, txt, scale, bias, None if groups is None else groups[local])
    loss.backward()
    torch.save({"loss": loss.detach(), "image_grad": img.grad, "text_grad": txt.grad, "scale_grad": scale.grad,
                "bias_grad": bias.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("groups", [None, torch.tensor([0, 1, 2, 0, 4, 1, 6, 7])], ids=["plain", "identical-texts"])
def test_sigmoid_loss_two_ranks_matches_one(tmp_path, groups) -> None:
    world = 2
    image, text = _embeddings(8, seed=1)
    run_on_ranks(world, _dist_worker, image, text, groups, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    img, txt = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    full = sigmoid_loss(img, txt, scale, bias, groups)
    full.backward()

    # Each rank sums its images' pairs over B_local; averaged over ranks (as DeepSpeed averages
    # gradients) that is the sum over all pairs over B_global: the one-process loss and gradients.
    torch.testing.assert_close(sum(r["loss"] for r in results) / world, full.detach(), atol=1e-10, rtol=0)
    rows = image.shape[0] // world
    for rank, r in enumerate(results):
        local = slice(rank * rows, (rank + 1) * rows)
        torch.testing.assert_close(r["image_grad"] / world, img.grad[local], atol=1e-10, rtol=0)
        torch.testing.assert_close(r["text_grad"] / world, txt.grad[local], atol=1e-10, rtol=0)
    for name, grad in (("scale_grad", scale.grad), ("bias_grad", bias.grad)):
        torch.testing.assert_close(sum(r[name] for r in results) / world, grad, atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def siglip():
    from vlforge.models.siglip.model import SigLIP

    torch.manual_seed(0)
    return SigLIP(vision=VISION, text=TEXT, embed_dim=32)


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, 8), generator=gen)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8),
            "text_input_ids": ids, "text_attention_mask": mask}


def test_siglip_starts_at_the_papers_scale_and_bias_and_its_loss_is_the_sigmoid_loss(siglip) -> None:
    batch = _batch()
    out = siglip(batch)
    assert out.extras["logit_scale"].item() == pytest.approx(10.0)
    assert out.extras["logit_bias"].item() == pytest.approx(-10.0)
    feats = siglip.extract_features({"image": batch["image"], "text_input_ids": batch["text_input_ids"],
                                     "text_attention_mask": batch["text_attention_mask"]})
    expected = sigmoid_loss(feats["image_embeds"], feats["text_embeds"], torch.tensor(10.0), torch.tensor(-10.0))
    torch.testing.assert_close(out.loss, expected)
    assert set(out.losses) == {"sigmoid"}


def test_siglip_trains_every_parameter(siglip) -> None:
    siglip.zero_grad()
    siglip(_batch(seed=1)).loss.backward()
    without_grad = [n for n, p in siglip.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []
    assert siglip.logit_bias.bias.grad.abs().item() > 0
