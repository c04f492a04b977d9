"""State dicts: read from any weights file or directory vlforge knows, and loaded into a (possibly
ZeRO-3 partitioned) model with every missing, unexpected or misshapen key named."""
from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from vlforge.core.checkpoints import (
    COMPLETE,
    consolidated_state_dict,
    resolve_checkpoint,
)
from vlforge.core.errors import CheckpointError
from vlforge.core.safetensors_read import cast_if_floating, read_safetensors_as


def read_weights(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a vlforge run/checkpoint directory, an HF-style model directory, or a file
    (.safetensors, or a torch pickle whose weights may sit under "model", "state_dict" or "module").
    `dtype`: floating-point tensors cast to it; a safetensors file's one at a time as read, so that a
    low-precision load never holds the whole file in full precision."""
    path = Path(path)
    if path.is_dir():
        if (path / COMPLETE).is_file() or (path / "checkpoints").is_dir() or any(path.glob("step_*")):
            return cast_floating(consolidated_state_dict(resolve_checkpoint(path)), dtype)
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"):
            if (path / name).is_file():
                return read_weights(path / name, dtype)
        raise CheckpointError(f"{path}: neither a vlforge run/checkpoint nor a model directory "
                              "(model.safetensors or pytorch_model.bin, whole or sharded with an .index.json)")
    if not path.is_file():
        raise CheckpointError(f"no weights at {path}")
    if path.name.endswith(".index.json"):
        return _read_shards(path, dtype)
    if path.suffix == ".safetensors":
        if dtype is not None:
            return read_safetensors_as(path, dtype)
        from safetensors.torch import load_file

        return load_file(str(path))
    # Only load checkpoints you trust: LAVIS and DeepSpeed files hold pickled objects besides tensors.
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return cast_floating(state, dtype)


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`state` with its floating-point tensors cast to `dtype` (None: as it is), in place: each
    full-precision tensor is let go as its cast is made."""
    if dtype is not None:
        for key in state:
            state[key] = cast_if_floating(state[key], dtype)
    return state


def _read_shards(index: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a sharded HF checkpoint: every shard its `.index.json` names, each checked to
    hold the keys the index places in it."""
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index} names the shard {index.parent / shard}, which is missing")
        part = read_weights(index.parent / shard, dtype)
        absent = [k for k, s in weight_map.items() if s == shard and k not in part]
        if absent:
            raise CheckpointError(f"shard {index.parent / shard} lacks {absent[:5]} ({len(absent)}), which {index.name} places there")
        state.update(part)
    return state


@dataclass
class LoadReport:
    """What a load left aside: checkpoint keys the model lacks, and (partial loads only) model weights
    the checkpoint lacks or holds in another shape, which keep their initialisation."""
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def load_into_model(module: nn.Module, state_dict: dict[str, torch.Tensor], allow_unexpected: bool = False,
                    partial: bool = False, allow_missing: Iterable[str] = (), assign: bool = False) -> LoadReport:
    """Load `state_dict` into `module` (ZeRO-3 partitioned or not, before or after deepspeed.initialize
    has wrapped it). Every model key must be there with its shape unless `partial`, but for the keys
    in `allow_missing` (which keep their initialisation); checkpoint keys the model does not have are
    an error unless `allow_unexpected`. `assign`: the checkpoint's tensors become the parameters
    (a model built on the meta device), instead of being copied into them."""
    allow_missing = set(allow_missing)
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    if partitioned:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        context = contextlib.nullcontext()
    with context:
        expected = module.state_dict()
        kept = [k for k in expected if k not in state_dict and k in allow_missing]  # keep their initialisation
        missing = [k for k in expected if k not in state_dict and k not in allow_missing]
        unexpected = sorted(k for k in state_dict if k not in expected)
        mismatched = [k for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
        shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
        if ((missing or shapes) and not partial) or (unexpected and not allow_unexpected):
            raise CheckpointError(f"checkpoint does not fit {type(module).__name__}: missing {missing[:10]} "
                                  f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
                                  f"shape mismatches {shapes[:10]}")
        fitting = {k: v for k, v in state_dict.items() if k in expected and k not in mismatched}
        if not fitting:
            raise CheckpointError(f"checkpoint has no weight that fits {type(module).__name__}")
        module.load_state_dict(fitting, strict=not (partial or kept), assign=assign)
    return LoadReport(unexpected, missing, mismatched)


@contextlib.contextmanager
def parameters_on_meta(enabled: bool = True) -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation
    cost); buffers stay real, as many are computed at construction and not saved (pixel statistics,
    rotary frequencies). Load weights with `load_into_model(..., assign=True)` afterwards."""
    if not enabled:
        yield
        return
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def tied_parameters(module: nn.Module) -> list[list[str]]:
    """Names of the parameters shared by several modules (an LM head tied to the word embeddings), one
    list per shared parameter."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def retie(module: nn.Module, groups: list[list[str]]) -> None:
    """Share again each group's first parameter under all its names (loading with assign unties them)."""
    for first, *others in groups:
        shared = module.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, shared)


def check_materialised(module: nn.Module) -> None:
    """CheckpointError naming the parameters and buffers still on the meta device (given no value)."""
    empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if empty:
        raise CheckpointError(f"no value for {empty[:10]} ({len(empty)}): the checkpoint does not hold them")


def resolve_converter(dotted: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """"package.module:function" (or "package.module.function") -> the function."""
    module, _, name = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"trainer.init_converter: cannot import {dotted!r} ({err})") from None
