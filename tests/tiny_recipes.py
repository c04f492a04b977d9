"""Tiny random models built from the demo recipes, with a small word-level tokenizer: what the model
and server tests run (no download, no training)."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from vlforge.config.recipes import compose_recipe
from vlforge.datasets.demo_tokenizer import SPECIAL_TOKENS, save_vocab_tokenizer

WORDS = ["a", "picture", "of", "red", "blue", "green", "circle", "square", "triangle", "small", "large",
         "left", "right", "what", "colour", "is", "the", "shape", "?", "on", "and", "yes", "no", "cat", "dog"]


def save_tokenizer(directory: Path, size: int = 512) -> Path:
    """A word-level tokenizer of `size` tokens (the demo models' vocabulary): the words, then w<i>."""
    tokens = [*SPECIAL_TOKENS, *WORDS]
    save_vocab_tokenizer(tokens + [f"w{i}" for i in range(size - len(tokens))], directory)
    return directory


def tiny_recipe(recipe: str, tokenizer: Path, overrides: list[str] = ()) -> DictConfig:
    return compose_recipe(recipe, [f"data.tokenizer={tokenizer}", *overrides])


def build_tiny(recipe: str, tokenizer: Path, seed: int = 0, overrides: list[str] = ()) -> tuple[nn.Module, DictConfig]:
    """The recipe's model with seeded random weights, LayerNorms perturbed (fresh ones hide swaps)."""
    cfg = tiny_recipe(recipe, tokenizer, list(overrides))
    torch.manual_seed(seed)
    model = instantiate(cfg.model, _convert_="all")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.add_(torch.randn_like(module.weight) * 0.2)
                module.bias.add_(torch.randn_like(module.bias) * 0.2)
    return model.eval(), cfg


def images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
