"""`load_model` and `load_model_and_preprocess`: a zoo model, or any vlforge run or export, built from
its recipe and loaded with its weights, ready for `generate`, `predict_answers` and the encoders.

    model, vis, txt = load_model_and_preprocess("blip_caption", "base_coco", device="cuda")
    model.generate({"image": vis["eval"](pil_image)[None].cuda()})

The weights are found in this order: `checkpoint=` (a vlforge run, checkpoint or export directory, or
an HF-format model directory for the hub entries), then the cache (`$VLFORGE_HOME/models/<name>/<type>`),
then the hub when online. Tokenizers come with the weights, never from a second download.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vlforge.models.sources import WeightsNotFoundError, hf_model_dir
from vlforge.models.zoo import ZooEntry, find_entry
from vlforge.trainer.checkpoint import CheckpointError


@dataclass
class _Resolved:
    cfg: DictConfig  # a composed recipe: its model and data nodes are read
    state: dict[str, torch.Tensor]  # already in the model's key names
    source: str
    keep_initialised: tuple[str, ...] = ()  # model keys the source has no value for (ZooEntry.ignore)


def _is_vlforge(path: Path) -> bool:
    from vlforge.export import is_export

    from vlforge.trainer.checkpoint import COMPLETE

    return (is_export(path) or (path / "config.yaml").is_file() or (path / COMPLETE).is_file()
            or (path / "checkpoints").is_dir())


def _recipe_target(entry: ZooEntry) -> str:
    from vlforge.config.recipes import compose_recipe

    return str(compose_recipe(entry.recipe, list(entry.overrides)).model._target_)


def _from_vlforge(entry: ZooEntry, path: Path) -> _Resolved:
    from vlforge.export import is_export, read_export, run_config
    from vlforge.trainer.weights import consolidated_state_dict, resolve_checkpoint

    if is_export(path):
        cfg, state = read_export(path)
    else:
        step_dir = resolve_checkpoint(path)
        cfg, state = run_config(step_dir), consolidated_state_dict(step_dir)
    expected, found = _recipe_target(entry), str(cfg.model.get("_target_"))
    if found != expected:
        raise ValueError(f"{path} holds a {found.rpartition('.')[2]} (recipe {cfg.get('name')}); "
                         f"{entry.name}/{entry.model_type} is a {expected.rpartition('.')[2]}")
    return _Resolved(cfg, state, str(path))


def blip_dimensions(hf_config: Any, target: str) -> dict[str, Any]:
    """Model-node values of an HF BLIP checkpoint's config (BlipConfig): the ViT and BERT dimensions,
    the special token ids and (retrieval) the ITC width. The converters map the weights themselves."""
    vision, text = hf_config.vision_config, hf_config.text_config
    node: dict[str, Any] = {
        "vision": {"name": "vit_base_patch16_224", "img_size": vision.image_size, "patch_size": vision.patch_size,
                   "embed_dim": vision.hidden_size, "depth": vision.num_hidden_layers,
                   "num_heads": vision.num_attention_heads, "mlp_ratio": vision.intermediate_size / vision.hidden_size,
                   "norm_eps": vision.layer_norm_eps},
        "text": {"vocab_size": text.vocab_size, "width": text.hidden_size, "layers": text.num_hidden_layers,
                 "heads": text.num_attention_heads, "intermediate": text.intermediate_size,
                 "max_len": text.max_position_embeddings},
    }
    if target.endswith("BlipRetrieval"):
        node["embed_dim"] = hf_config.image_text_hidden_size
    else:  # the captioner and VQA decoders: HF BLIP starts decoding at bos ([DEC]) and stops at [SEP]
        node.update(bos_token_id=text.bos_token_id, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)
    return node


def open_clip_dimensions(model_cfg: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    """Model-node values of an open_clip checkpoint's `model_cfg` (open_clip_config.json, a ViT CLIP):
    the tower and text dimensions, the embedding width and the activation (QuickGELU for OpenAI's
    weights: the config's `quick_gelu`, else `quick_gelu` as the recipe has it)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if not isinstance(vision.get("patch_size"), int) or "timm_model_name" in vision:
        raise ValueError("open_clip_config.json: only ViT image towers (vision_cfg.patch_size) load here")
    act = "quick_gelu" if model_cfg.get("quick_gelu", quick_gelu) else "gelu"
    return {
        "embed_dim": model_cfg["embed_dim"],
        "vision": {"name": "vit_base_patch16_clip_224", "pretrained": False, "img_size": vision["image_size"],
                   "patch_size": vision["patch_size"], "embed_dim": vision["width"], "depth": vision["layers"],
                   "num_heads": vision["width"] // vision.get("head_width", 64),
                   "mlp_ratio": vision.get("mlp_ratio", 4.0), "act_layer": act},
        "text": {"vocab_size": text["vocab_size"], "width": text["width"], "layers": text["layers"],
                 "heads": text["heads"], "max_len": text["context_length"], "act": act},
    }


def _dimensions(entry: ZooEntry, directory: Path, cfg: DictConfig) -> tuple[dict[str, Any], int]:
    """(model-node values, image size) from the source's own config file."""
    if entry.dimensions == "blip":
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        return blip_dimensions(hf_config, str(cfg.model._target_)), hf_config.vision_config.image_size
    model_cfg = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]
    quick = cfg.model.vision.get("act_layer") == "quick_gelu"
    return open_clip_dimensions(model_cfg, quick), model_cfg["vision_cfg"]["image_size"]


def _from_hf(entry: ZooEntry, directory: Path) -> _Resolved:
    from vlforge.config.recipes import compose_recipe
    from vlforge.models.sources import missing_files, weights_file
    from vlforge.trainer.weights import read_weights, resolve_converter

    directory = directory.resolve()
    missing = missing_files(directory, entry)
    if missing:
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {directory / missing[0]} is missing "
                                   f"(the directory needs {', '.join(entry.files)} and one of {', '.join(entry.weights)})")
    cfg = compose_recipe(entry.recipe, [*entry.overrides, f"data.tokenizer={directory}"])
    if entry.dimensions is not None:
        node, image_size = _dimensions(entry, directory, cfg)
        cfg.model.vision = node.pop("vision")
        cfg.model.text = OmegaConf.merge(cfg.model.text, node.pop("text"))
        for key, value in node.items():
            OmegaConf.update(cfg, f"model.{key}", value, force_add=True)
        for split in ("train_image", "eval_image"):
            cfg.data[split].size = image_size
    state = resolve_converter(entry.converter)(read_weights(weights_file(directory, entry)))
    return _Resolved(cfg, state, str(directory), entry.ignore)


def _resolve(entry: ZooEntry, checkpoint: str | Path | None) -> _Resolved:
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(f"checkpoint={path}: no such file or directory")
        if _is_vlforge(path):
            return _from_vlforge(entry, path)
        if entry.kind != "hf":
            raise CheckpointError(f"checkpoint={path}: {entry.name}/{entry.model_type} loads a vlforge run, "
                                  f"checkpoint or export directory (config.yaml, complete.json or export.json)")
        return _from_hf(entry, path)
    if entry.kind == "run":
        path = Path(entry.location)
        if not path.exists():
            raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: no run at {path.resolve()}; train it first "
                                       f"(deepspeed launch/train.py recipe={entry.recipe}) or pass checkpoint=")
        return _from_vlforge(entry, path)
    return _from_hf(entry, hf_model_dir(entry))


def _build(resolved: _Resolved, is_eval: bool, device: str | torch.device) -> nn.Module:
    from vlforge.trainer.weights import load_into_model

    model = instantiate(resolved.cfg.model, _convert_="all")
    try:
        # Strict (every key both ways, every shape) but for the model keys the source never has.
        report = load_into_model(model, resolved.state, partial=bool(resolved.keep_initialised))
        left = [k for k in report.missing if k not in resolved.keep_initialised] + report.mismatched
        if left:
            raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: no value for {left[:10]} ({len(left)})")
    except CheckpointError as err:
        raise CheckpointError(f"{resolved.source}: {err}") from None
    _to_device(model, torch.device(device))
    return model.eval() if is_eval else model


def _to_device(model: nn.Module, device: torch.device) -> None:
    """`model.to(device)`, but for submodules accelerate has already placed (an LM loaded with
    `device_map`, or quantized by bitsandbytes), which stay where they are."""
    placed = {id(m) for m in model.modules() if getattr(m, "hf_device_map", None)}
    if not placed:
        model.to(device)
        return
    for child in model.children():
        if not any(id(m) in placed for m in child.modules()):
            child.to(device)


def load_model(name: str, model_type: str, is_eval: bool = True, device: str | torch.device = "cpu",
               checkpoint: str | Path | None = None) -> nn.Module:
    """The zoo model `name`/`model_type` (see `model_zoo`) with its weights, on `device`; in eval mode
    unless `is_eval=False`. `checkpoint`: a local directory to load instead of the zoo's (a vlforge run,
    checkpoint or export, or an HF / open_clip model directory for the hub entries)."""
    entry = find_entry(name, model_type)
    return _build(_resolve(entry, checkpoint), is_eval, device)


def processors(cfg: DictConfig) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """The recipe's image and text processors, {"train": ..., "eval": ...} each, as training uses them:
    images become uint8 [3, H, W] tensors (the model normalises), texts are normalised strings."""
    from vlforge.config.schema import validate_config
    from vlforge.datasets.processors import TextProcessor, build_image_transform

    data = validate_config(cfg).data
    vis = {"train": build_image_transform(data.train_image), "eval": build_image_transform(data.eval_image)}
    text = TextProcessor(data.text)
    return vis, {"train": text, "eval": text}


def load_model_and_preprocess(name: str, model_type: str, is_eval: bool = True, device: str | torch.device = "cpu",
                              checkpoint: str | Path | None = None) -> tuple[nn.Module, dict[str, Callable], dict[str, Callable]]:
    """(model, image processors, text processors) of `load_model`, the processors from the same recipe."""
    entry = find_entry(name, model_type)
    resolved = _resolve(entry, checkpoint)
    vis, txt = processors(resolved.cfg)
    return _build(resolved, is_eval, device), vis, txt
