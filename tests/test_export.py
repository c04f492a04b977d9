"""The export rewrites only tokenizer keys to its own copy (an LM's `pretrained` may name the same path)."""
from __future__ import annotations

from vlforge.export import _tokenizer_keys


def test_only_keys_named_tokenizer_point_at_the_exported_tokenizer() -> None:
    config = {"data": {"tokenizer": "/lm"}, "model": {"tokenizer": "/lm", "language_model": {"pretrained": "/lm"}},
              "name": "llava_finetune"}
    assert _tokenizer_keys(config, "/lm") == ["data.tokenizer", "model.tokenizer"]
