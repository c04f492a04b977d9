"""vlforge: vision-language models trained, evaluated and loaded from YAML recipes.

    from vlforge import load_model, load_model_and_preprocess, model_zoo

The inference API (vlforge.hub) is resolved on first use, so that `import vlforge.datasets` in a
loader worker does not import Hydra, the recipes and every model family.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["__version__", "load_model", "load_model_and_preprocess", "model_zoo"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "load_model_and_preprocess"):
        from vlforge.hub import load

        return getattr(load, name)
    if name == "model_zoo":
        from vlforge.hub.zoo import model_zoo

        return model_zoo
    raise AttributeError(f"module 'vlforge' has no attribute '{name}'")
