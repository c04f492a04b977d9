"""`load_model` and `load_model_and_preprocess`: a zoo model, or any vlforge run or export, built from
its recipe and loaded with its weights, ready for `generate`, `predict_answers` and the encoders.

    model, vis, txt = load_model_and_preprocess("blip_caption", "base_coco", device="cuda")
    model.generate({"image": vis["eval"](pil_image)[None].cuda()})

The weights are found in this order: `checkpoint=` (a vlforge run, checkpoint or export directory, or
an HF-format model directory for the hub entries), then the Hugging Face cache (HF_HOME), then files put
by hand in `$VLFORGE_HOME/models/<name>/<type>`, then the hub when online. Tokenizers come with the weights, never from a second download.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vlforge.config.recipes import compose_recipe
from vlforge.config.schema import validate_config
from vlforge.core.checkpoints import (
    COMPLETE,
    consolidated_state_dict,
    resolve_checkpoint,
)
from vlforge.core.errors import CheckpointError
from vlforge.core.state_dict import (
    cast_floating,
    check_materialised,
    load_into_model,
    parameters_on_meta,
    read_weights,
    resolve_converter,
    retie,
    tied_parameters,
)
from vlforge.datasets.processors import TextProcessor, build_image_transform
from vlforge.hub.dimensions import apply_dimensions
from vlforge.hub.export import export_weights, is_export, read_export_config, run_config
from vlforge.hub.placement import (
    LanguageModelPlacement,
    apply_quant,
    place_language_model,
    placement_config,
    placement_of,
    set_compiled_decoding,
    to_device,
)
from vlforge.hub.sources import (
    WeightsNotFoundError,
    entry_files_dir,
    hf_model_dir,
    missing_files,
    tower_file,
    url_model_dir,
    weights_file,
)
from vlforge.hub.tokenizer_files import tokenizer_with_special_tokens
from vlforge.hub.weights import init_weights
from vlforge.hub.zoo import find_entry
from vlforge.models.towers.pos_embed import fit_position_embeddings
from vlforge.models.zoo_entry import ZooEntry


@dataclass
class _Resolved:
    cfg: DictConfig  # a composed recipe: its model and data nodes are read
    state: dict[str, torch.Tensor]  # already in the model's key names
    source: str
    keep_initialised: tuple[str, ...] = ()  # model keys the source has no value for (ZooEntry.ignore)


def _is_vlforge(path: Path) -> bool:
    return (is_export(path) or (path / "config.yaml").is_file() or (path / COMPLETE).is_file()
            or (path / "checkpoints").is_dir())


def _recipe_target(entry: ZooEntry) -> str:
    return str(compose_recipe(entry.recipe, list(entry.overrides)).model._target_)


def _existing(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"checkpoint={path}: no such file or directory")
    return path


def _read_dtype(quant: str | None, cfg: DictConfig) -> torch.dtype | None:
    """The dtype the weights may be read in: the one the whole model is held in ("bf16", and "int8",
    which quantizes bfloat16 weights), but where LoRA adapters are merged into the weights first."""
    return torch.bfloat16 if quant in ("bf16", "int8") and not cfg.model.get("lora") else None


def _vlforge_source(path: Path, quant: str | None = None) -> tuple[DictConfig, dict[str, torch.Tensor]]:
    """(the composed recipe it was made with, its weights) of an export, a run or a checkpoints/step_N;
    read in the dtype `quant` holds the model in."""
    if is_export(path):
        cfg = read_export_config(path)
        return cfg, read_weights(export_weights(path), _read_dtype(quant, cfg))
    step_dir = resolve_checkpoint(path)
    cfg = run_config(step_dir)
    return cfg, cast_floating(consolidated_state_dict(step_dir), _read_dtype(quant, cfg))


def _from_vlforge(entry: ZooEntry, path: Path, quant: str | None) -> _Resolved:
    cfg, state = _vlforge_source(path, quant)
    expected, found = _recipe_target(entry), str(cfg.model.get("_target_"))
    if found != expected:
        raise ValueError(f"{path} holds a {found.rpartition('.')[2]} (recipe {cfg.get('name')}); "
                         f"{entry.name}/{entry.model_type} is a {expected.rpartition('.')[2]}")
    return _Resolved(cfg, state, str(path))


def _from_hf(entry: ZooEntry, directory: Path, overrides: Sequence[str] = (),
             weights: Path | None = None, quant: str | None = None) -> _Resolved:
    """An "hf:" / "url:" source: `directory` holds the entry's files (config, tokenizer) and, unless
    `weights` names a file elsewhere, its weights, read in the dtype `quant` holds the model in."""
    directory = directory.resolve()
    missing = ([name for name in entry.files if not (directory / name).is_file()] if weights is not None
               else missing_files(directory, entry))
    if missing:
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {directory / missing[0]} is missing "
                                   f"(the directory needs {', '.join(entry.files)} and one of {', '.join(entry.weights)})")
    tokenizer = tokenizer_with_special_tokens(directory, entry.special_tokens)
    cfg = compose_recipe(entry.recipe, [*entry.overrides, *overrides, f"data.tokenizer={tokenizer}"])
    if entry.dimensions is not None:
        apply_dimensions(cfg, entry.dimensions, directory)
    weights = weights or weights_file(directory, entry)
    dtype = _read_dtype(quant, cfg)
    state = _with_tower(entry, cfg, read_weights(weights, dtype), weights.parent, dtype)
    state = resolve_converter(entry.converter)(state)
    return _Resolved(cfg, state, str(weights if entry.kind == "url" else directory), entry.ignore)


def _with_tower(entry: ZooEntry, cfg: DictConfig, state: dict[str, torch.Tensor], beside: Path,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`state` with the entry's separate image-tower file merged in (under the weights' own key names)
    when it has no tower of its own; the file is looked for beside the weights, then in the entry's
    cache (fetched when online)."""
    if entry.tower_source is None or any(key.startswith("visual_encoder.") for key in state):
        return state
    name = entry.tower_source.rpartition("/")[2]
    path = beside / name if (beside / name).is_file() else tower_file(entry)
    tower = resolve_converter(entry.tower_converter)(read_weights(path, dtype), OmegaConf.to_container(cfg.model))
    return {**tower, **state}


def _from_weights_file(entry: ZooEntry, path: Path, overrides: Sequence[str], quant: str | None) -> _Resolved:
    """A single weights file (a LAVIS .pth) for a "url:" entry, its tokenizer files beside it or in
    the entry's cache."""
    if entry.kind != "url":
        raise CheckpointError(f"checkpoint={path}: {entry.name}/{entry.model_type} (source {entry.origin}) loads a "
                              "directory; a single weights file loads for the LAVIS rows (source='lavis')")
    beside = path.parent
    directory = beside if all((beside / name).is_file() for name in entry.files) else entry_files_dir(entry)
    return _from_hf(entry, directory, overrides, weights=path.resolve(), quant=quant)


def _resolve(entry: ZooEntry, checkpoint: str | Path | None, overrides: Sequence[str] = (),
             quant: str | None = None) -> _Resolved:
    """The recipe and weights to build from; the weights read in the dtype `quant` holds the model in."""
    if checkpoint is not None:
        path = _existing(checkpoint)
        if path.is_file():
            return _from_weights_file(entry, path, overrides, quant)
        if _is_vlforge(path):
            _no_overrides(overrides, path)
            return _from_vlforge(entry, path, quant)
        if entry.kind not in ("hf", "url"):
            raise CheckpointError(f"checkpoint={path}: {entry.name}/{entry.model_type} loads a vlforge run, "
                                  f"checkpoint or export directory (config.yaml, complete.json or export.json)")
        return _from_hf(entry, path, overrides, quant=quant)
    if entry.kind == "run":
        path = Path(entry.location)
        if not path.exists():
            raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: no run at {path.resolve()}; train it first "
                                       f"(vlforge train recipe={entry.recipe}) or pass checkpoint=")
        _no_overrides(overrides, path)
        return _from_vlforge(entry, path, quant)
    # A "url:" entry loads as an "hf:" one, its dimensions from the recipe (ZooEntry.dimensions None).
    return _from_hf(entry, url_model_dir(entry) if entry.kind == "url" else hf_model_dir(entry), overrides,
                    quant=quant)


def _no_overrides(overrides: Sequence[str], path: Path) -> None:
    if overrides:
        raise ValueError(f"overrides={list(overrides)}: {path} is a vlforge run or export, built by its own recipe; "
                         "overrides apply to the zoo's published weights")


def _find(name: str, model_type: str, source: str | None, checkpoint: str | Path | None) -> ZooEntry:
    """The zoo row to load: of `source` when given; a single weights file as `checkpoint` is a LAVIS
    .pth, so it picks the LAVIS row."""
    if source is None and checkpoint is not None and Path(checkpoint).expanduser().is_file():
        source = "lavis"
    return find_entry(name, model_type, source)


def _build(resolved: _Resolved, is_eval: bool, device: str | torch.device,
           placement: LanguageModelPlacement = LanguageModelPlacement(), quant: str | None = None,
           compile: bool = False) -> nn.Module:
    device = torch.device(device)
    cfg, compute_dtype = placement_config(resolved.cfg, placement, device)
    # Built with its parameters on the meta device, the checkpoint's tensors then becoming them: no
    # random initialisation, and no second copy of the weights. Keys the source lacks keep their
    # initialisation, so such a model, or one whose constructor loads weights itself, is built whole.
    empty = not resolved.keep_initialised and not _loads_pretrained(cfg.model)
    with parameters_on_meta(empty):
        model = instantiate(cfg.model, _convert_="all")
    try:
        # Strict (every key both ways, every shape) but for the model keys the source never has.
        state = fit_position_embeddings(resolved.state, model)
        # `state` holds the only references now: once the model holds the weights, a cast to low
        # precision frees each full-precision tensor as it goes.
        resolved.state.clear()
        tied = tied_parameters(model)
        load_into_model(model, state, allow_missing=_kept_keys(model, resolved.keep_initialised), assign=empty)
        if empty:
            retie(model, tied)
            check_materialised(model)
    except CheckpointError as err:
        raise CheckpointError(f"{resolved.source}: {err}") from None
    del state
    place_language_model(model, placement, compute_dtype, device)
    to_device(model, device)
    apply_quant(model, quant)
    set_compiled_decoding(model, compile)
    return model.eval() if is_eval else model


def _loads_pretrained(node: Any) -> bool:
    """Whether a model config names pretrained weights its constructor loads (`pretrained: <name>`)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        return any((key == "pretrained" and bool(value)) or _loads_pretrained(value) for key, value in node.items())
    if isinstance(node, list):
        return any(_loads_pretrained(value) for value in node)
    return False


def _kept_keys(model: nn.Module, ignore: Sequence[str]) -> list[str]:
    """The model keys an entry's `ignore` names: a key, or every key under a name ending in a dot."""
    prefixes = tuple(name for name in ignore if name.endswith("."))
    return [*ignore, *(key for key in model.state_dict() if prefixes and key.startswith(prefixes))]


def load_model(name: str, model_type: str, is_eval: bool = True, device: str | torch.device = "cpu",
               checkpoint: str | Path | None = None, load_4bit: bool = False, load_8bit: bool = False,
               compute_dtype: str | None = None, device_map: str | dict[str, Any] | None = None,
               source: str | None = None, overrides: Sequence[str] = (), quant: str | None = None,
               compile: bool = False) -> nn.Module:
    """The zoo model `name`/`model_type` (see `model_zoo`) with its weights, on `device`; in eval mode
    unless `is_eval=False`. `checkpoint`: local weights to load instead of the zoo's: a vlforge run,
    checkpoint or export directory, an HF / open_clip model directory for the hub rows, or a LAVIS
    `.pth` file (its tokenizer files beside it, or fetched into the zoo's cache).

    `source` picks the release where a name and type have several ("hf", "lavis"): each row carries
    the settings its source's code runs with (LayerNorm eps, the [ENC] token, label smoothing, image
    size), so LAVIS weights behave as in LAVIS and HF's as in transformers. A weights file as
    `checkpoint` means source "lavis". `overrides`: Hydra overrides on the row's recipe (dimensions of
    a checkpoint of another size, `model.vision.img_size=...`).

    For a model with a language model (blip2_opt, llava): `load_4bit` / `load_8bit` quantize the LM's
    linear layers with bitsandbytes (nf4 with double quantization / LLM.int8) onto `device`, its head
    and embeddings unquantized, and hold the image tower in `compute_dtype` (default float16 on a GPU,
    bfloat16 on the CPU); `device_map="auto"` (or a map) spreads the LM over the visible GPUs with
    accelerate.

    `quant` holds the whole model in low precision for inference: "bf16" (every weight in bfloat16),
    "int8" (bfloat16, and every linear layer outside the image tower as torchao's int8 weights, for
    fast decoding on a CPU or a GPU), or "nf4" (the same as `load_4bit=True`). `compile=True` decodes
    through a static-shape step compiled by torch.compile (BLIP's captioner and VQA model): faster per
    token, after a compilation for each batch size and length first seen. In bf16 or int8 on a CPU the
    step's graph holds the decoder's weights as constants (inductor's freezing), packed for its own
    matrix products: a second copy of them, taken at the first call (change the weights, load again)."""
    entry = _find(name, model_type, source, checkpoint)
    return _build(_resolve(entry, checkpoint, overrides, quant), is_eval, device,
                  placement_of(load_4bit, load_8bit, compute_dtype, device_map, quant), quant, compile)


def processors(cfg: DictConfig) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """The recipe's image and text processors, {"train": ..., "eval": ...} each, as training uses them:
    images become uint8 [3, H, W] tensors (the model normalises), texts are normalised strings."""
    data = validate_config(cfg).data
    vis = {"train": build_image_transform(data.train_image), "eval": build_image_transform(data.eval_image)}
    text = TextProcessor(data.text)
    return vis, {"train": text, "eval": text}


def load_model_and_preprocess(name: str, model_type: str, is_eval: bool = True, device: str | torch.device = "cpu",
                              checkpoint: str | Path | None = None, load_4bit: bool = False, load_8bit: bool = False,
                              compute_dtype: str | None = None, device_map: str | dict[str, Any] | None = None,
                              source: str | None = None, overrides: Sequence[str] = (), quant: str | None = None,
                              ) -> tuple[nn.Module, dict[str, Callable], dict[str, Callable]]:
    """(model, image processors, text processors) of `load_model`, the processors from the same recipe."""
    model, cfg = load_model_and_recipe(name, model_type, is_eval, device, checkpoint, load_4bit, load_8bit,
                                       compute_dtype, device_map, source, overrides, quant)
    vis, txt = processors(cfg)
    return model, vis, txt


def load_model_and_recipe(name: str, model_type: str, is_eval: bool = True, device: str | torch.device = "cpu",
                          checkpoint: str | Path | None = None, load_4bit: bool = False, load_8bit: bool = False,
                          compute_dtype: str | None = None, device_map: str | dict[str, Any] | None = None,
                          source: str | None = None, overrides: Sequence[str] = (), quant: str | None = None,
                          ) -> tuple[nn.Module, DictConfig]:
    """(model, the composed recipe it was built from) of `load_model`: the recipe's data node names its
    tokenizer, text length and image transforms."""
    entry = _find(name, model_type, source, checkpoint)
    resolved = _resolve(entry, checkpoint, overrides, quant)
    placement = placement_of(load_4bit, load_8bit, compute_dtype, device_map, quant)
    return _build(resolved, is_eval, device, placement, quant), resolved.cfg


def load_recipe_model(cfg: DictConfig, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                      is_eval: bool = True, device_map: str | dict[str, Any] | None = None,
                      quant: str | None = None) -> nn.Module:
    """The model of a composed recipe `cfg` on `device`, with the weights of `checkpoint` (a vlforge run,
    checkpoint or export directory: every key, both ways, as `vlforge eval` loads them) or, without one,
    those its `trainer.init_from` names (as training would start), else its fresh initialisation.
    `device_map` spreads its language model over devices, and `quant` holds it in low precision, as in
    `load_model`."""
    placement = placement_of(False, False, None, device_map, quant)
    if checkpoint is not None:  # the recipe builds the model; the checkpoint's own recipe is not read
        path = _existing(checkpoint)
        return _build(_Resolved(cfg, _vlforge_source(path, quant)[1], f"checkpoint={path}"), is_eval, device, placement,
                      quant)
    cfg, _ = placement_config(cfg, placement, torch.device(device))
    model = instantiate(cfg.model, _convert_="all")
    trainer = cfg.get("trainer", {})
    if trainer.get("init_from"):
        init_weights(model, str(trainer.init_from), trainer.get("init_converter"), bool(trainer.get("init_partial")))
    place_language_model(model, placement, None, torch.device(device))
    to_device(model, torch.device(device))
    apply_quant(model, quant)
    return model.eval() if is_eval else model


def checkpoint_recipe(checkpoint: str | Path) -> DictConfig:
    """The composed recipe a vlforge run, checkpoint or export directory was made with."""
    path = _existing(checkpoint)
    if is_export(path):
        return read_export_config(path)
    return run_config(resolve_checkpoint(path))
