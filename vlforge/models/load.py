"""`load_model` and `load_model_and_preprocess`: a zoo model, or any vlforge run or export, built from
its recipe and loaded with its weights, ready for `generate`, `predict_answers` and the encoders.

    model, vis, txt = load_model_and_preprocess("blip_caption", "base_coco", device="cuda")
    model.generate({"image": vis["eval"](pil_image)[None].cuda()})

The weights are found in this order: `checkpoint=` (a vlforge run, checkpoint or export directory, or
an HF-format model directory for the hub entries), then the cache (`$VLFORGE_HOME/models/<name>/<type>`),
then the hub when online. Tokenizers come with the weights, never from a second download.
"""
from __future__ import annotations

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

    return is_export(path) or (path / "config.yaml").is_file() or (path / "complete.json").is_file()


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


def _from_hf(entry: ZooEntry, directory: Path) -> _Resolved:
    from transformers import AutoConfig

    from vlforge.config.recipes import compose_recipe
    from vlforge.trainer.weights import read_weights, resolve_converter

    directory = directory.resolve()
    if not (directory / "config.json").is_file():
        raise WeightsNotFoundError(f"{directory / 'config.json'} is missing: an HF-format model directory holds "
                                   f"its config.json beside the weights")
    hf_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    cfg = compose_recipe(entry.recipe, [*entry.overrides, f"data.tokenizer={directory}"])
    node = blip_dimensions(hf_config, str(cfg.model._target_))
    cfg.model.vision = node.pop("vision")
    cfg.model.text = OmegaConf.merge(cfg.model.text, node.pop("text"))
    for key, value in node.items():
        OmegaConf.update(cfg, f"model.{key}", value, force_add=True)
    for split in ("train_image", "eval_image"):
        cfg.data[split].size = hf_config.vision_config.image_size
    state = resolve_converter(entry.converter)(read_weights(directory))
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
    unless `is_eval=False`. `checkpoint`: a local directory or file to load instead of the zoo's."""
    entry = find_entry(name, model_type)
    return _build(_resolve(entry, checkpoint), is_eval, device)


def processors(cfg: DictConfig) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """The recipe's image and text processors, {"train": ..., "eval": ...} each, as training uses them:
    images become uint8 [3, H, W] tensors (the model normalises), texts are normalised strings."""
    from vlforge.config.schema import DataConfig
    from vlforge.datasets.processors import TextProcessor, build_image_transform

    node = OmegaConf.to_container(cfg, resolve=True)["data"]  # resolved in the whole recipe: it refers to model.*
    data: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))
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
