"""`vlforge serve`: a model (a zoo name, a recipe, or a run / export directory) behind the FastAPI app,
under uvicorn. Ctrl-C or SIGTERM stops accepting connections and lets in-flight requests finish
(`serve.graceful_shutdown_s`), streams included, before the process exits."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import uvicorn
from fastapi import FastAPI
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vlforge.config.recipes import compose_recipe
from vlforge.config.serve import ServeConfig, serve_config
from vlforge.core.errors import ConfigError
from vlforge.hub.load import checkpoint_recipe, load_model_and_recipe, load_recipe_model, processors
from vlforge.serve.app import create_app
from vlforge.serve.auth import load_api_keys
from vlforge.serve.metrics import ServeMetrics
from vlforge.serve.scheduler import Scheduler
from vlforge.serve.service import ModelService
from vlforge.serve.state import ServerState
from vlforge.serve.threads import in_thread_of_its_own


@dataclass
class ServeRequest:
    """What to serve: `model` "name:type" of the zoo, or `recipe`, and/or `checkpoint`; `overrides`
    are `serve.*` keys and, with a recipe, any of its keys."""

    model: str | None = None
    recipe: str | None = None
    checkpoint: str | None = None
    overrides: list[str] = field(default_factory=list)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"serve.device={name!r}: {err}") from None


def _serve_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    serve = [o for o in overrides if o.startswith("serve.")]
    return serve, [o for o in overrides if not o.startswith("serve.")]


def serve_settings(request: ServeRequest) -> ServeConfig:
    """The serve config of `request`'s `serve.*` overrides (ConfigError naming a bad key)."""
    serve_keys, _ = _serve_overrides(request.overrides)
    return serve_config(OmegaConf.from_dotlist([o[len("serve."):] for o in serve_keys]))


def served_recipe(request: ServeRequest, config: ServeConfig) -> DictConfig | None:
    """The composed recipe of a recipe / checkpoint request (quantization applied), None for a zoo
    model; ConfigError for a request that cannot be served, before any weights are read."""
    serve_keys, other = _serve_overrides(request.overrides)
    if request.model is not None:
        if request.recipe is not None or other:
            raise ConfigError(f"{request.model}: a zoo model takes serve.* overrides and checkpoint= only "
                              f"(got {', '.join(other) or 'recipe=' + str(request.recipe)})")
        if ":" not in request.model:
            raise ConfigError(f"'{request.model}': name a zoo model as NAME:TYPE, e.g. blip_caption:base_coco "
                              "(`vlforge zoo` lists them)")
        return None
    if request.recipe is not None:
        try:
            cfg = compose_recipe(request.recipe, [*other, *serve_keys])
        except ConfigCompositionException as err:
            raise ConfigError(f"recipe={request.recipe}: {str(err).splitlines()[0]}") from None
    elif request.checkpoint is not None:
        if other:
            raise ConfigError(f"checkpoint={request.checkpoint} is served with the recipe it was made with; "
                              f"{', '.join(other)} needs recipe=<name> too")
        cfg = checkpoint_recipe(request.checkpoint)
    else:
        raise ConfigError("name what to serve: a zoo model (vlforge serve blip_caption:base_coco), "
                          "recipe=<name> [checkpoint=<run or export>], or checkpoint=<run or export>")
    if config.quantize in ("4bit", "8bit"):
        key = "load_4bit" if config.quantize == "4bit" else "load_8bit"
        if key not in cfg.model:
            raise ConfigError(f"serve.quantize={config.quantize}: {cfg.model._target_} has no language model to quantize")
        cfg.model[key] = True
    return cfg


def _low_precision(config: ServeConfig) -> str | None:
    return config.quantize if config.quantize in ("int8", "bf16") else None


def load_served_model(request: ServeRequest) -> tuple[nn.Module, DictConfig, ServeConfig, str, torch.device]:
    """(model in eval mode on its device, its composed recipe, the serve config, the served name, device)."""
    config = serve_settings(request)
    device = _device(config.device)
    cfg = served_recipe(request, config)
    if cfg is None:
        name, _, model_type = str(request.model).partition(":")
        model, cfg = load_model_and_recipe(name, model_type, device=device, checkpoint=request.checkpoint,
                                           load_4bit=config.quantize == "4bit", load_8bit=config.quantize == "8bit",
                                           device_map=config.device_map, quant=_low_precision(config))
        return model, cfg, config, config.model_name or str(request.model), device
    model = load_recipe_model(cfg, request.checkpoint, device, device_map=config.device_map,
                              quant=_low_precision(config))
    return model, cfg, config, config.model_name or str(cfg.get("name", request.recipe)), device


def build_app(request: ServeRequest, api_keys: tuple[bytes, ...] | None = None) -> tuple[FastAPI, ServeConfig]:
    """The app for `request`'s model, and its serve config (host, port, shutdown grace). `api_keys`:
    the keys to require, read elsewhere (a replica gets its driver's); None reads the serve config's."""
    # Loaded by a thread that ends with the load, so that its CPU threads do not outlive it (vlforge.serve.threads).
    model, cfg, config, name, device = in_thread_of_its_own(load_served_model, request)
    return app_for_model(model, cfg, config, name, device, api_keys=api_keys), config


def app_for_model(model: nn.Module, cfg: DictConfig, config: ServeConfig, name: str,
                  device: torch.device | str = "cpu", warm: bool = True,
                  api_keys: tuple[bytes, ...] | None = None) -> FastAPI:
    """The app serving a model already loaded (in eval mode, on `device`), `cfg` its composed recipe."""
    transform = processors(cfg)[0]["eval"]
    service = ModelService(model, cfg, name, torch.device(device), transform)
    metrics = ServeMetrics()
    scheduler = Scheduler(service.stepwise, config.batching, metrics, device)
    keys = load_api_keys(config) if api_keys is None else api_keys
    state = ServerState(service, config, scheduler, metrics, keys)
    return create_app(state, warm=warm)


def serve(request: ServeRequest) -> None:
    """Build the app and run it under uvicorn until Ctrl-C / SIGTERM (then drain and exit)."""
    app, config = build_app(request)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=int(config.graceful_shutdown_s) or None,
                                           limit_concurrency=None))
    server.run()
