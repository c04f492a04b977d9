"""Inference in low precision: a loaded model held in bfloat16, or with its text side's linear layers in
int8 (torchao's weight-only int8, per output channel), chosen by `load_model(quant=...)` and
`serve.quantize`.

What each mode holds:
- "bf16": every floating-point parameter and buffer in bfloat16; activations follow.
- "int8": the model in bfloat16, and the linear layers outside the image tower as int8 weights with
  one scale per output channel. Decoding reads
  every text-side weight once per token, so it is bound by the bytes of those weights; the image
  tower is bound by arithmetic on its many tokens, where int8 weights buy nothing (the weight is
  widened before the product), so it stays in bfloat16.

torchao makes the int8 weights and their scales. Run eagerly, its layer widens the weight before each
product; for the few rows decoding feeds a layer, the product must instead read the int8 weight
itself. On the CPU a quantized layer calls ATen's weight-only int8 kernel (`_weight_int8pack_mm`,
the kernel torch.compile's graph of torchao's layer calls there) directly: the same numbers, without
a compile in each new process or a compiled call's overhead per layer. On other devices it runs
through one compiled linear. For the many rows of a prompt or an image, where the product costs more
than the widening, it widens its weight once per call.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.core.host_memory import return_freed_memory

QUANT_MODES = ("bf16", "int8", "nf4")

# Rows a quantized layer takes at once above which it widens its weight instead of running the fused
# kernel: a prompt or image tokens, not a decoding step (a batch of 32 rows with 3 beams stays fused).
FUSED_MAX_ROWS = 128
# ATen's weight-only int8 kernel on the CPU (torch 2.14; compiled graphs call it too) reads past the
# input of a layer whose input width is not a multiple of 16 (NaNs or a crash): such layers widen
# their weight instead.
FUSED_IN_MULTIPLE = 16
# Bytes of float weights quantized between two hand-backs of the memory they and their temporaries
# leave with the C allocator (core/host_memory), which otherwise stays resident: the peak of the
# quantization grows with the model. Not after every layer: a page handed back is faulted in again
# when next used (docs/benchmarks.md, cold start).
RETURN_FREED_EVERY = 128 * 2**20


def check_quant(quant: str | None, what: str = "quant") -> None:
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"{what}={quant!r}: expected one of None, {', '.join(map(repr, QUANT_MODES))}")


_compiled_linear: Callable[..., torch.Tensor] | None = None


def _fused_linear() -> Callable[..., torch.Tensor]:
    global _compiled_linear
    if _compiled_linear is None:
        # One graph per weight shape (torchao's tensor carries its shape in its metadata): a model has
        # a handful, more than dynamo's default limit of 8 for a model with a Q-Former and an LM.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._functorch.config.enable_autograd_cache = False
        # torch's own linear, not F.linear's current binding: DeepSpeed's zero.Init rebinds that one.
        _compiled_linear = torch.compile(torch._C._nn.linear, dynamic=True)
    return _compiled_linear


class Int8Linear(nn.Module):
    """A linear layer holding torchao's int8 weight (`weight`, `bias` as the layer it replaces had them,
    so the model's key names stay)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.fused = self.in_features % FUSED_IN_MULTIPLE == 0
        zero_point = getattr(self.weight, "zero_point", None)
        if not hasattr(self.weight, "qdata") or not hasattr(self.weight, "scale") or (
                zero_point is not None and bool(zero_point.any())):
            raise TypeError(f"torchao gave a {type(self.weight).__name__} weight, not the symmetric int8 weight "
                            "with one scale per output channel (qdata, scale) that Int8Linear computes with")
        # The scales in the activations' dtype, stored: a scale cast inside a compiled graph is a computed
        # input, which inductor's lowering of the kernel does not take (torch 2.14).
        self.register_buffer("scales", self.weight.scale.reshape(-1).to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not self.fused or rows > FUSED_MAX_ROWS:
            return F.linear(x, self.weight.dequantize().to(x.dtype), self.bias)
        if x.device.type != "cpu":
            return _fused_linear()(x, self.weight, self.bias)
        weight = self.weight  # torchao's Int8Tensor: int8 `qdata` [out, in]
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), weight.qdata, scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight"


class _Quantized:
    """How many layers and float bytes were quantized; hands freed memory back every
    RETURN_FREED_EVERY bytes."""

    def __init__(self) -> None:
        self.layers, self.pending = 0, 0

    def add(self, float_bytes: int) -> None:
        self.layers, self.pending = self.layers + 1, self.pending + float_bytes
        if self.pending >= RETURN_FREED_EVERY:
            return_freed_memory()
            self.pending = 0


def _quantize_int8(parent: nn.Module, skip: set[int], done: _Quantized) -> None:
    """Replace every nn.Linear under `parent` but those in `skip` (module ids) by an Int8Linear."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for name, child in list(parent.named_children()):
        if id(child) in skip:
            continue
        if isinstance(child, nn.Linear):
            # A layer's weight may be shared (an LM head tied to the word embeddings): the head gets
            # its own int8 copy, the embedding table keeps its weight.
            holder, dtype = nn.Sequential(child), child.weight.dtype
            float_bytes = child.weight.numel() * child.weight.element_size()
            quantize_(holder, Int8WeightOnlyConfig(set_inductor_config=False))
            setattr(parent, name, Int8Linear(holder[0], dtype))
            done.add(float_bytes)
        else:
            _quantize_int8(child, skip, done)


def apply_low_precision(model: nn.Module, quant: str) -> None:
    """Hold `model` (its weights loaded, on its device) in `quant` ("bf16" or "int8"), in place."""
    check_quant(quant)
    if quant == "bf16":
        model.to(torch.bfloat16)
        return
    if quant != "int8":
        raise ValueError(f"apply_low_precision: {quant!r} is not a low-precision mode (nf4 quantizes the LM with bitsandbytes)")
    try:
        import torchao  # noqa: F401
    except ImportError as err:
        raise ImportError(f"quant='int8' needs torchao: pip install 'vlforge[quant]' ({err})") from None
    # bfloat16 even on a CPU without bfloat16 instructions: decoding reads weights, and half the
    # bytes is faster there too; the image tower's arithmetic is then emulated.
    model.to(torch.bfloat16)
    tower, done = getattr(model, "vision", None), _Quantized()
    _quantize_int8(model, {id(tower)} if isinstance(tower, nn.Module) else set(), done)
    return_freed_memory()
    if not done.layers:
        raise ValueError(f"quant='int8': {type(model).__name__} has no linear layer outside its image tower")
