"""bitsandbytes quantization of a model's language model: as a pretrained LM loads (training, QLoRA:
`quantization_config` for transformers' `from_pretrained`), or in memory after any checkpoint has
loaded in full precision (inference, `load_model(load_4bit=True)`: `quantize_language_model`).

Both follow the seed's loader: 4-bit is nf4 with double quantization, 8-bit is LLM.int8 (outlier
threshold 6); every linear layer of the LM is quantized but its output head, and the embeddings and
norms stay as they are.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"4-bit / 8-bit loading needs bitsandbytes: pip install 'vlforge[quant]' ({err})") from None
    return bitsandbytes


def quant_bits(load_4bit: bool, load_8bit: bool) -> int | None:
    if load_4bit and load_8bit:
        raise ValueError("load_4bit and load_8bit are exclusive")
    return 4 if load_4bit else 8 if load_8bit else None


def quantization_config(load_4bit: bool, load_8bit: bool, compute_dtype: str) -> Any:
    """transformers' BitsAndBytesConfig, for a pretrained LM quantized as it loads."""
    bits = quant_bits(load_4bit, load_8bit)
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {', '.join(DTYPES)}")
    _bitsandbytes()
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype])


def _quantized(linear: nn.Linear, bits: int, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    bnb = _bitsandbytes()
    weight = linear.weight.data
    if bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes as the weight moves to its device


def quantize_language_model(language_model: nn.Module, bits: int, compute_dtype: str, device: str | torch.device) -> int:
    """Replace, in place, every `nn.Linear` of `language_model` but its output head by a bitsandbytes
    layer of `bits` (4: nf4 with double quantization, computing in `compute_dtype`; 8: LLM.int8), each
    quantized onto `device` as it is replaced, so the full-precision LM is never there whole. Returns
    how many layers were quantized."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {', '.join(DTYPES)}")
    head = language_model.get_output_embeddings() if hasattr(language_model, "get_output_embeddings") else None
    targets = [(name, module) for name, module in language_model.named_modules()
               if isinstance(module, nn.Linear) and module is not head]
    if not targets:
        raise ValueError(f"{type(language_model).__name__} has no nn.Linear layer to quantize (GPT-2's Conv1D "
                         "layers are not supported); load it without load_4bit / load_8bit")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        setattr(parent, child, _quantized(linear, bits, DTYPES[compute_dtype], torch.device(device)))
    return len(targets)
