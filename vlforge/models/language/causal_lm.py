"""transformers causal (and encoder-decoder) LMs as parts of a vision-language model (BLIP-2 stage 2, LLaVA): built from a
pretrained directory or hub id, or from a config (tiny and random in tests), optionally quantized."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from vlforge.core.tokenizers import load_tokenizer


def build_causal_lm(pretrained: str | None = None, config: Mapping[str, Any] | None = None,
                    quantization_config: Any = None, device_map: str | Mapping[str, Any] | None = None,
                    config_overrides: Mapping[str, Any] | None = None) -> PreTrainedModel:
    """A transformers causal LM from `pretrained` (a directory, or a hub id) or from `config` (a dict
    with `model_type`, e.g. {model_type: opt, hidden_size: 64, ...}); exactly one of them.
    `quantization_config` (bitsandbytes) quantizes a pretrained LM as it loads, on this process's GPU
    (LOCAL_RANK) or on the CPU. `device_map` (inference: "auto" spreads the layers over every visible
    GPU through accelerate) places a pretrained LM as it loads. `config_overrides` replace attributes
    of the pretrained LM's config (as LAVIS's BLIP-2 T5 sets FlanT5's `dense_act_fn`)."""
    return _build_lm(AutoModelForCausalLM, pretrained, config, quantization_config, device_map, config_overrides)


def build_seq2seq_lm(pretrained: str | None = None, config: Mapping[str, Any] | None = None,
                     quantization_config: Any = None, device_map: str | Mapping[str, Any] | None = None,
                     config_overrides: Mapping[str, Any] | None = None) -> PreTrainedModel:
    """A transformers encoder-decoder LM (T5, FlanT5, BART) as `build_causal_lm` builds a causal one."""
    return _build_lm(AutoModelForSeq2SeqLM, pretrained, config, quantization_config, device_map, config_overrides)


def _build_lm(auto: Any, pretrained: str | None, config: Mapping[str, Any] | None, quantization_config: Any,
              device_map: str | Mapping[str, Any] | None, config_overrides: Mapping[str, Any] | None) -> PreTrainedModel:
    if (pretrained is None) == (config is None):
        raise ValueError("model.language_model needs exactly one of 'pretrained' (a directory or hub id) or 'config'")
    if config is not None and (device_map is not None or quantization_config is not None):
        raise ValueError("model.language_model: device_map and quantization apply to a pretrained LM, not to `config`")
    overrides = dict(config_overrides or {})
    if config is not None:
        config = dict(config)
        if "model_type" not in config:
            raise ValueError("model.language_model.config needs a 'model_type' (opt, llama, t5, ...)")
        built = AutoConfig.for_model(config.pop("model_type"), **config)
        return auto.from_config(_override(built, overrides, "model.language_model.config"))
    local = os.path.isdir(pretrained)
    extra: dict[str, Any] = {}
    if quantization_config is not None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        extra.update(quantization_config=quantization_config, device_map={"": device})
    if device_map is not None:
        extra["device_map"] = dict(device_map) if isinstance(device_map, Mapping) else device_map
    try:
        if overrides:
            extra["config"] = _override(AutoConfig.from_pretrained(pretrained, local_files_only=local), overrides,
                                        f"'{pretrained}'")
        return auto.from_pretrained(pretrained, local_files_only=local, **extra)
    except OSError as err:
        raise OSError(f"model.language_model.pretrained '{pretrained}' is neither a local model directory nor "
                      f"loadable from the hub (offline={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}") from None


def _override(config: Any, overrides: Mapping[str, Any], source: str) -> Any:
    # After construction: a config's __init__ derives some attributes (T5's dense_act_fn from
    # feed_forward_proj) and would overwrite them if passed in.
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.language_model.config_overrides.{key}: the {config.model_type} config of "
                             f"{source} has no such attribute")
        setattr(config, key, value)
    return config


def language_model_config_node(config: Any, keep_dtype: bool) -> dict[str, Any]:
    """A transformers config (PretrainedConfig) as a `language_model.config` node: what rebuilds the
    same architecture with `build_causal_lm(config=...)`. `from_config` builds in the config's `dtype`:
    `keep_dtype` keeps it (what `from_pretrained` would have loaded the LM in), else the LM is built in
    the default dtype."""
    dropped = ("transformers_version", "torch_dtype", *(() if keep_dtype else ("dtype",)))
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in dropped}


def prompt_token_count(tokenizer: str, prompt: str) -> int:
    """How many tokens a text starting with `prompt` begins with before its own: the tokenizer's
    leading special tokens (a bos, or [CLS]) plus the prompt's tokens. These are not scored."""
    tok = load_tokenizer(tokenizer)
    probe = tok("a").input_ids
    leading = probe.index(tok("a", add_special_tokens=False).input_ids[0])
    return leading + len(tok(prompt, add_special_tokens=False).input_ids)
