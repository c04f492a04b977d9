"""`vlforge recipes` and `vlforge zoo`: what can be trained and what can be loaded, looked up without
building a model."""
from __future__ import annotations

import re
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlforge.cli.usage import UsageError, unknown_name
from vlforge.config.recipes import RECIPES_DIR, available_recipes, compose_recipe
from vlforge.hub.zoo import ENTRIES, format_table

SUMMARY_WIDTH = 100  # characters of a recipe's description in the listing


def recipe_summary(path: Path, width: int = SUMMARY_WIDTH) -> str:
    """The first sentence of the comment that opens a recipe file ("" without one), in about `width`
    characters: longer ones lose their parentheses, then the clauses after the last one that fits.
    Hydra's `# @package` directive is not part of it."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    summary = re.split(r"(?<=\.)\s", " ".join(lines).strip(), maxsplit=1)[0]
    while len(summary) > width and re.search(r"\([^()]*\)", summary):
        summary = re.sub(r"\s*\([^()]*\)", "", summary, count=1)
    if len(summary) <= width:
        return summary
    cuts = [m.start() for m in re.finditer(r"[:;,]\s", summary) if m.start() <= width - 3]
    cut = cuts[-1] if cuts else summary.rfind(" ", 0, width - 2)
    return summary[:cut if cut > 0 else width - 3].rstrip() + "..."


def list_recipes() -> str:
    """One line per recipe of recipes/recipe/: its name and what it trains."""
    names = available_recipes()
    width = max(map(len, names), default=0)
    return "\n".join(f"{name.ljust(width)}  {recipe_summary(RECIPES_DIR / 'recipe' / f'{name}.yaml')}".rstrip()
                     for name in names)


def describe_recipe(name: str, overrides: list[str] | None = None, resolve: bool = False) -> str:
    """The config `vlforge train recipe=<name> <overrides>` runs with, as YAML; UsageError for an
    unknown recipe or an override that does not apply."""
    if name not in available_recipes():
        raise unknown_name("recipe", name, available_recipes(), "vlforge recipes")
    try:
        return OmegaConf.to_yaml(compose_recipe(name, overrides or []), resolve=resolve)
    except (HydraException, OmegaConfBaseException) as err:  # a key the schema lacks, a value of the wrong type
        raise UsageError(f"recipe {name}: {err}") from err


def describe_model(name: str) -> str:
    """The model types the zoo has under `name`: the recipe that builds each and where its weights come
    from; UsageError for a name the zoo lacks."""
    entries = [entry for entry in ENTRIES if entry.name == name]
    if not entries:
        raise unknown_name("model", name, sorted({entry.name for entry in ENTRIES}), "vlforge zoo")
    table = format_table([("model_type", "source", "recipe", "weights", "description"),
                          *[(e.model_type, e.origin, e.recipe, e.source, e.description) for e in entries]])
    return (f'{table}\n\nload one with vlforge.load_model("{name}", "<model_type>"), or of one source with '
            f'source="<source>" (the first row of a type is the default)')
