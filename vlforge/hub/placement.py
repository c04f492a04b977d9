"""How `load_model` holds a loaded model: its language model quantized with bitsandbytes or spread
over GPUs with accelerate (`LanguageModelPlacement`), the whole model in low precision (`quant`), its
decoding compiled, and the move to its device."""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vlforge.hub.low_precision import apply_low_precision, check_quant
from vlforge.models.language.quantize import quant_bits, quantize_language_model

# The image tower's dtype option (vision.py TOWER_DTYPES) for each LM compute dtype.
_TOWER_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class LanguageModelPlacement:
    """How `load_model` holds a model's language model: quantized (`bits` 4 or 8, computing in
    `compute_dtype`, the image tower held in it too) or spread over GPUs (`device_map`)."""

    bits: int | None = None
    compute_dtype: str | None = None
    device_map: str | dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.bits is not None or self.device_map is not None


def placement_config(cfg: DictConfig, placement: LanguageModelPlacement, device: torch.device) -> tuple[DictConfig, str | None]:
    """The config to build with, and the compute dtype of a quantized LM."""
    if not placement.active:
        return cfg, None
    target = str(cfg.model.get("_target_")).rpartition(".")[2]
    if "language_model" not in cfg.model:
        raise ValueError(f"load_4bit / load_8bit / quant='nf4' / device_map apply to a model with a language model (blip2_opt, "
                         f"llava); {target} has none")
    if placement.device_map is not None and importlib.util.find_spec("accelerate") is None:
        # Checked before anything is built or read: the model would otherwise load whole first.
        raise ImportError("device_map= places the language model through accelerate, which is not installed: "
                          "pip install 'vlforge[quant]' (or pip install accelerate)")
    if placement.bits is None:
        return cfg, None
    if placement.device_map is not None:
        raise ValueError("load_4bit / load_8bit with device_map: quantize onto one device (device=...); "
                         "a 4-bit LM of 7B parameters fits one GPU")
    compute_dtype = placement.compute_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    if compute_dtype not in _TOWER_DTYPE:
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {', '.join(_TOWER_DTYPE)}")
    cfg = copy.deepcopy(cfg)
    # The seed's loader: the tower in the half precision the LM computes in; a run's own quantize-at-load
    # (QLoRA) options are off, since its weights load in full precision first.
    OmegaConf.update(cfg, "model.vision.dtype", _TOWER_DTYPE[compute_dtype], force_add=True)
    for key in ("load_4bit", "load_8bit"):
        if key in cfg.model:
            cfg.model[key] = False
    return cfg, compute_dtype


def place_language_model(model: nn.Module, placement: LanguageModelPlacement, compute_dtype: str | None,
                          device: torch.device) -> None:
    if placement.bits is not None:
        _merge_lora(model)
        quantize_language_model(model.language_model, placement.bits, compute_dtype, device)
    if placement.device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        lm = model.language_model
        device_map = placement.device_map
        if device_map == "auto":
            device_map = infer_auto_device_map(lm, no_split_module_classes=getattr(lm, "_no_split_modules", None))
        dispatch_model(lm, device_map=dict(device_map))


def set_compiled_decoding(model: nn.Module, compile: bool) -> None:
    """With `compile`, the model decodes through its compiled static step (ValueError if it has none)."""
    if not compile:
        return
    if not hasattr(model, "compile_decoding"):
        raise ValueError(f"compile=True: {type(model).__name__} has no compiled decoding step (BLIP's captioner "
                         "and VQA model have one)")
    model.compile_decoding = True


def _merge_lora(model: nn.Module) -> None:
    """LoRA adapters merged into the weights they adapt, before those are quantized."""
    if getattr(model, "lora", False):
        model.language_model = model.language_model.merge_and_unload()
        model.lora = False


def apply_quant(model: nn.Module, quant: str | None) -> None:
    """`quant` "bf16" / "int8": the loaded model held in low precision (LoRA adapters merged first)."""
    if quant in ("bf16", "int8"):
        _merge_lora(model)
        apply_low_precision(model, quant)


def to_device(model: nn.Module, device: torch.device) -> None:
    """`model.to(device)`, but for submodules accelerate has placed (an LM loaded or dispatched with a
    `device_map`), which stay where they are. Layers quantized onto `device` are already there."""
    placed = {id(m) for m in model.modules() if getattr(m, "hf_device_map", None)}
    if not placed:
        model.to(device)
        return
    for child in model.children():
        if not any(id(m) in placed for m in child.modules()):
            child.to(device)


def placement_of(load_4bit: bool, load_8bit: bool, compute_dtype: str | None,
               device_map: str | dict[str, Any] | None, quant: str | None = None) -> LanguageModelPlacement:
    check_quant(quant)
    if quant is not None and (load_4bit or load_8bit):
        raise ValueError(f"quant={quant!r} with load_4bit / load_8bit: choose one (quant='nf4' is load_4bit=True)")
    if quant in ("bf16", "int8") and device_map is not None:
        raise ValueError(f"quant={quant!r} with device_map: a low-precision model is held on one device")
    return LanguageModelPlacement(quant_bits(load_4bit or quant == "nf4", load_8bit), compute_dtype, device_map)
