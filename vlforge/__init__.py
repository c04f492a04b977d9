"""vlforge: vision-language models trained, evaluated and loaded from YAML recipes.

    from vlforge import load_model, load_model_and_preprocess, model_zoo
"""
from __future__ import annotations

from vlforge.hub.load import load_model, load_model_and_preprocess
from vlforge.hub.zoo import model_zoo

__version__ = "0.2.0"
__all__ = ["__version__", "load_model", "load_model_and_preprocess", "model_zoo"]
