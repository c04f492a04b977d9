"""A safetensors file read tensor by tensor with plain reads, each cast as it arrives.

safetensors' own reader maps the file: every page it touches counts in the process's resident memory
until the file is closed, so reading a float32 file into bfloat16 peaks at the whole file plus its
cast. Read here, only one float32 tensor is held at a time. The format: an 8-byte little-endian
header length, a JSON header (per tensor: dtype, shape, [start, end) offsets into the data that
follows), then the data, little-endian.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO

import torch

from vlforge.core.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def cast_if_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating point (and a dtype is given), else as it is."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def read_safetensors_as(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path`, the floating-point ones cast to `dtype`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        try:
            length = int.from_bytes(file.read(8), "little")
            if not 2 <= length <= size - 8:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(file.read(length))
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
        data_size = size - 8 - length
        tensors = {}
        for key, entry in entries:
            stored, shape, (start, end) = DTYPES.get(entry.get("dtype")), entry.get("shape"), entry["data_offsets"]
            if stored is None:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry.get('dtype')!r}, which vlforge "
                                      "does not read")
            needed = math.prod(shape) * stored.itemsize if isinstance(shape, list) else -1
            if end - start != needed or not 0 <= start <= end <= data_size:
                raise CheckpointError(f"{path}: tensor {key!r} ({entry.get('dtype')} {shape}) claims bytes "
                                      f"[{start}, {end}) of the {data_size} the file holds, {needed} needed")
            tensors[key] = _read_tensor(file, 8 + length + start, end - start, stored, shape, dtype)
            if tensors[key] is None:
                raise CheckpointError(f"{path}: cut short inside tensor {key!r}")
    return {key: tensors[key] for key in sorted(tensors)}


def _read_tensor(file: BinaryIO, offset: int, size: int, stored: torch.dtype, shape: list[int],
                 dtype: torch.dtype) -> torch.Tensor | None:
    """One tensor, cast to `dtype` if floating point (None: the file ends inside it). A function of
    its own so that the stored bytes are let go on return, before the next tensor's are read."""
    file.seek(offset)
    data = bytearray(size)
    if file.readinto(data) != size:
        return None
    tensor = (torch.frombuffer(data, dtype=stored) if size else torch.empty(0, dtype=stored)).reshape(shape)
    return cast_if_floating(tensor, dtype)
