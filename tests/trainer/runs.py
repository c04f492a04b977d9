"""Runs composed from the built-in recipes, for the trainer's unit tests."""
from __future__ import annotations

from vlforge.config.recipes import compose_recipe
from vlforge.config.schema import RunConfig, validate_config


def make_run(*overrides: str) -> RunConfig:
    """The clip_demo recipe with `overrides`, validated as the launcher validates it."""
    return validate_config(compose_recipe("clip_demo", list(overrides)))
