"""The LAVIS fixtures of tests/fixtures/lavis: tiny models built and run by LAVIS's own code
(make_fixtures.py there, in a LAVIS environment), their weights as LAVIS checkpoints and their
outputs. The tests load the .pth files with `load_model` and compare at TOL."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lavis"

TOL = dict(rtol=1e-5, atol=1e-5)

# The fixtures' sizes (make_fixtures.py): the zoo rows' recipes hold the published ones.
IMAGE_SIZE = 64
_VOCAB = len((FIXTURES / "vocab.txt").read_text().split("\n")) - 1


def tiny_overrides(vocab_extra: int = 2, embed: bool = False) -> list[str]:
    """Recipe overrides giving a zoo row the fixtures' dimensions: `vocab_extra` tokens LAVIS adds to
    BERT's vocabulary (BLIP: [DEC] and [ENC])."""
    out = ["model.vision.name=vit_base_patch16_224", f"model.vision.img_size={IMAGE_SIZE}", "model.vision.patch_size=16",
           "model.vision.embed_dim=48", "model.vision.depth=2", "model.vision.num_heads=4",
           f"model.text.vocab_size={_VOCAB + vocab_extra}", "model.text.width=32", "model.text.layers=2",
           "model.text.heads=4", "model.text.intermediate=64", "model.text.max_len=64",
           f"data.train_image.size={IMAGE_SIZE}", f"data.eval_image.size={IMAGE_SIZE}"]
    return ["++" + o for o in out + (["model.embed_dim=16"] if embed else [])]


def weights(name: str) -> Path:
    return FIXTURES / f"{name}.pth"


def expected(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / f"{name}.expected.pt", weights_only=True)
