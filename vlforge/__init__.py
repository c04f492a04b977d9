"""vlforge: vision-language models trained, evaluated and loaded from YAML recipes.

    from vlforge import load_model, load_model_and_preprocess, model_zoo, normalized_pixels
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["__version__", "load_model", "load_model_and_preprocess", "model_zoo", "normalized_pixels"]

# transformers imports torchao when it is installed (vlforge[quant]), and torchao registers enums that
# torch now handles natively: torch logs a deprecation line for each, on every command.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "register_constant()" not in record.getMessage())

if TYPE_CHECKING:
    from vlforge.hub.load import load_model, load_model_and_preprocess
    from vlforge.hub.zoo import model_zoo
    from vlforge.models.towers.base import normalized_pixels


def __getattr__(name: str) -> Any:
    # Loaded on first use: importing a light submodule (the CLI, the serving middleware Ray's proxy
    # loads, a config schema) must not pay for torch and transformers.
    if name in ("load_model", "load_model_and_preprocess"):
        from vlforge.hub import load

        return getattr(load, name)
    if name == "model_zoo":
        from vlforge.hub.zoo import model_zoo

        return model_zoo
    if name == "normalized_pixels":
        from vlforge.models.towers.base import normalized_pixels

        return normalized_pixels
    raise AttributeError(f"module 'vlforge' has no attribute {name!r}")
