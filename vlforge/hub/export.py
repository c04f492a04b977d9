"""Export a training checkpoint (any ZeRO stage, any world size) as a directory that loads anywhere:

    python -m vlforge.hub.export runs/blip_caption_demo exports/blip_caption_demo

writes `model.safetensors` (the consolidated fp32 weights), `config.yaml` (the run's composed recipe),
`tokenizer/` (a copy of the recipe's tokenizer, so the export needs nothing else) and `export.json`
(where it came from). `load_model(name, model_type, checkpoint=<out_dir>)` builds the model from it.
The directory appears whole or not at all: it is written under a temporary name and renamed last.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vlforge.core.checkpoints import (
    COMPLETE,
    consolidated_state_dict,
    resolve_checkpoint,
)
from vlforge.core.errors import CheckpointError
from vlforge.core.tokenizers import load_tokenizer
from vlforge.models.language.causal_lm import language_model_config_node

EXPORT_INFO = "export.json"

WEIGHTS = "model.safetensors"

CONFIG = "config.yaml"

TOKENIZER = "tokenizer"


def run_config(step_dir: Path) -> DictConfig:
    """The composed recipe a checkpoint's run started with (`<run dir>/config.yaml`)."""
    path = step_dir.parent.parent / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run's composed recipe, which {step_dir} needs to be rebuilt")
    return OmegaConf.load(path)


def _tokenizer_keys(node: Any, value: str, prefix: str = "") -> list[str]:
    """Dotted keys named `tokenizer` that hold `value` (an LM's `pretrained` may hold the same path)."""
    if isinstance(node, dict):
        return [k for key, child in node.items() for k in _tokenizer_keys(child, value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == value and prefix[:-1].rpartition(".")[2] == "tokenizer" else []


def _self_contained_language_model(cfg: DictConfig) -> str | None:
    """A `model.language_model.pretrained` LM (LLaVA, BLIP-2 stage 2) becomes `config:` its own
    config: the export holds the LM's weights, so loading it needs neither the LM's directory nor the
    hub. Quantize-at-load options go with `pretrained` (the export is full precision; load_model
    quantizes in memory). Returns where the config came from."""
    lm = cfg.model.get("language_model") if "model" in cfg else None
    if lm is None or lm.get("pretrained") is None:
        return None
    from transformers import AutoConfig

    pretrained = str(lm.pretrained)
    try:
        lm_config = AutoConfig.from_pretrained(pretrained, local_files_only=os.path.isdir(pretrained))
    except OSError as err:
        raise CheckpointError(f"model.language_model.pretrained={pretrained}: its config.json, which the export "
                              f"records so that it loads without it, is unreadable ({err})") from None
    keep = {k: v for k, v in OmegaConf.to_container(lm, resolve=True).items() if k not in ("pretrained", "device_map")}
    # In the dtype `from_pretrained` loaded it in (its config's), as loading the run itself does.
    cfg.model.language_model = {**keep, "config": language_model_config_node(lm_config, keep_dtype=True)}
    for key in ("load_4bit", "load_8bit"):
        if cfg.model.get(key):
            cfg.model[key] = False
    return pretrained


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): each key gets its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def export_run(source: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Export `source` (a run directory: its newest complete checkpoint; or a `checkpoints/step_N`
    directory) to `out_dir`; returns what export.json records."""
    step_dir = resolve_checkpoint(source)
    cfg = run_config(step_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    step = int(json.loads((step_dir / COMPLETE).read_text())["step"])
    return write_export(consolidated_state_dict(step_dir), cfg, out_dir, str(step_dir.resolve()), step)


def export_model(model: torch.nn.Module, cfg: DictConfig, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Export a model in memory (e.g. one `load_model` gave, or a finetune outside the trainer) with the
    composed recipe `cfg` that builds it, as `export_run` exports a checkpoint."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in model.state_dict().items()}
    return write_export(state, cfg, out_dir, f"{type(model).__name__} in memory", 0)


def write_export(state: dict[str, torch.Tensor], cfg: DictConfig, out_dir: Path, source: str, step: int) -> dict[str, Any]:
    """Write an export directory whole (under a temporary name, renamed last); returns export.json's record."""
    from safetensors.torch import save_file

    cfg = copy.deepcopy(cfg)
    state = _unshared(state)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        container = OmegaConf.to_container(cfg, resolve=True)
        tokenizer = container.get("data", {}).get("tokenizer")
        tokenizer_keys: list[str] = []
        if tokenizer:
            load_tokenizer(str(tokenizer)).save_pretrained(str(tmp / TOKENIZER))
            tokenizer_keys = _tokenizer_keys(container, tokenizer)
            for key in tokenizer_keys:  # relative to the export directory; read_export_config makes them absolute
                OmegaConf.update(cfg, key, TOKENIZER, merge=False)
        lm_source = _self_contained_language_model(cfg)
        OmegaConf.save(cfg, tmp / CONFIG, resolve=True)
        info = {
            "format": 1,
            "source": source,
            "step": step,
            "recipe": str(cfg.get("name")),
            "model": str(cfg.model.get("_target_")),
            "tensors": len(state),
            "parameters": sum(t.numel() for t in state.values()),
            "tokenizer_keys": tokenizer_keys,
            "language_model_config_from": lm_source,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def is_export(path: Path) -> bool:
    return (path / EXPORT_INFO).is_file()


def export_weights(path: str | Path) -> Path:
    """The weights file of an export (safetensors)."""
    return Path(path).resolve() / WEIGHTS


def read_export_config(path: str | Path) -> DictConfig:
    """An export's composed recipe, its tokenizer keys pointing into the export."""
    path = Path(path).resolve()
    info = json.loads((path / EXPORT_INFO).read_text())
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"export {path} is incomplete: {path / name} is missing")
    cfg = OmegaConf.load(path / CONFIG)
    for key in info.get("tokenizer_keys", []):
        OmegaConf.update(cfg, key, str(path / TOKENIZER), merge=False)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlforge.hub.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory (its newest complete checkpoint) or a checkpoints/step_N directory")
    parser.add_argument("out_dir", help="the directory to write (must not exist, or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(argv)
    try:
        info = export_run(args.source, args.out_dir, args.overwrite)
    except (CheckpointError, OSError) as err:  # no checkpoint, OUT not empty, tokenizer unreadable
        print(f"vlforge.hub.export: {err}", file=sys.stderr)
        return 1
    size = (Path(args.out_dir) / WEIGHTS).stat().st_size / 2**20
    print(f"vlforge: exported step {info['step']} of {info['source']} ({info['recipe']}, {info['model']}) to "
          f"{Path(args.out_dir).resolve()}: {WEIGHTS} ({info['tensors']} tensors, "
          f"{info['parameters'] / 1e6:.2f}M values, {size:.1f} MiB), {CONFIG}"
          + (f", {TOKENIZER}/" if info["tokenizer_keys"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
