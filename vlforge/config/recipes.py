"""Where the recipe tree is, and composing a recipe outside a launcher (tests, evaluation, load_model)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vlforge.config.schema import register_schemas

# Installed: the package vlforge.recipes; editable: the repo's recipes/ (setup.py maps one to the other).
# Looked up by name: importing the package would import vlforge's top, and with it the hub.
RECIPES_DIR = Path(str(files("vlforge.recipes"))).resolve()
register_schemas()


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (RECIPES_DIR / "recipe").glob("*.yaml"))


def compose_recipe(recipe: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config `launch/train.py recipe=<recipe> <overrides>` would run with."""
    if recipe not in available_recipes():
        raise ValueError(f"unknown recipe '{recipe}'; available: {', '.join(available_recipes())}")
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        return compose(config_name="train", overrides=[f"recipe={recipe}", *overrides])
