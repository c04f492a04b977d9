"""vlforge's models. `from vlforge.models import load_model, load_model_and_preprocess, model_zoo` (the
inference API, vlforge.models.load / zoo) is resolved on first use, so that importing one model file
does not import Hydra and the recipes."""
from __future__ import annotations

from typing import Any

__all__ = ["load_model", "load_model_and_preprocess", "model_zoo"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "load_model_and_preprocess"):
        from vlforge.models import load

        return getattr(load, name)
    if name == "model_zoo":
        from vlforge.models.zoo import model_zoo

        return model_zoo
    raise AttributeError(f"module 'vlforge.models' has no attribute '{name}'")
