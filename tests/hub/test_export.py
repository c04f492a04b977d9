"""The export rewrites only tokenizer keys to its own copy (an LM's `pretrained` may name the same path)."""
from __future__ import annotations

import torch

from vlforge.hub.export import _tokenizer_keys


def test_only_keys_named_tokenizer_point_at_the_exported_tokenizer() -> None:
    config = {"data": {"tokenizer": "/lm"}, "model": {"tokenizer": "/lm", "language_model": {"pretrained": "/lm"}},
              "name": "llava_finetune"}
    assert _tokenizer_keys(config, "/lm") == ["data.tokenizer", "model.tokenizer"]


def test_a_pretrained_language_model_is_recorded_by_its_config(tmp_path) -> None:
    from omegaconf import OmegaConf
    from transformers import OPTConfig

    from vlforge.hub.export import _self_contained_language_model
    from vlforge.models.language.causal_lm import build_causal_lm

    OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=40,
              word_embed_proj_dim=16, max_position_embeddings=20, dtype="float16").save_pretrained(str(tmp_path / "lm"))
    cfg = OmegaConf.create({"model": {"load_4bit": True, "language_model": {"pretrained": str(tmp_path / "lm"),
                                                                           "device_map": "auto"}}})
    assert _self_contained_language_model(cfg) == str(tmp_path / "lm")
    assert set(cfg.model.language_model) == {"config"} and cfg.model.load_4bit is False
    (tmp_path / "lm" / "config.json").unlink()  # the export no longer needs the LM's directory
    lm = build_causal_lm(**OmegaConf.to_container(cfg.model.language_model))
    # In the dtype the LM's own config gives, as from_pretrained loads it for the run.
    assert (lm.config.hidden_size, lm.config.vocab_size, lm.dtype) == (16, 40, torch.float16)
    assert _self_contained_language_model(OmegaConf.create({"model": {"language_model": {"config": {}}}})) is None
