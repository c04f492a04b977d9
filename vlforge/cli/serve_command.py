"""`vlforge serve`: parse what to serve and hand it to vlforge.serve.server."""
from __future__ import annotations

import argparse
import sys

from vlforge.cli.usage import UsageError
from vlforge.core.errors import CheckpointError, ConfigError
from vlforge.hub.sources import WeightsNotFoundError
from vlforge.serve.replicas import serve_replicas
from vlforge.serve.server import ServeRequest, serve, serve_settings

DESCRIPTION = (
    "Serve a model over HTTP: OpenAI-compatible /v1/chat/completions (streaming too) and the task\n"
    "endpoints /v1/caption, /v1/vqa, /v1/classify, /v1/embeddings, /v1/match, with continuous batching.\n\n"
    "  vlforge serve blip_caption:base_coco                      a zoo model (`vlforge zoo`)\n"
    "  vlforge serve recipe=blip_caption checkpoint=runs/x       a recipe with a run's weights\n"
    "  vlforge serve checkpoint=exports/x                        a run or export, with its own recipe\n\n"
    "serve.* keys set host, port, batching, limits, API keys and quantization (recipes/serve/default.yaml),\n"
    "e.g. serve.port=9000 serve.batching.max_running=64; with recipe=, any recipe key too.\n"
    "serve.replicas=N runs N replicas on Ray Serve (a local Ray, or serve.address=HOST:PORT of a cluster);\n"
    "serve.device_map=auto spreads a large language model over the GPUs of each replica.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", help="a zoo model as NAME:TYPE, e.g. blip_caption:base_coco")
    parser.add_argument("overrides", metavar="key=value", nargs="*",
                        help="recipe=NAME, checkpoint=PATH, serve.* keys (and recipe keys with recipe=)")


def serve_request(model: str | None, overrides: list[str]) -> ServeRequest:
    """Split the command line into what to serve and the overrides."""
    if model is not None and "=" in model:
        overrides, model = [model, *overrides], None
    request = ServeRequest(model=model)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"'{item}' is not key=value (only one MODEL may be given)")
        if key == "recipe":
            request.recipe = value
        elif key == "checkpoint":
            request.checkpoint = None if value in ("", "null") else value
        else:
            request.overrides.append(item)
    return request


def run(args: argparse.Namespace) -> int:
    request = serve_request(args.model, args.overrides)
    try:
        config = serve_settings(request)
        if config.replicas > 1 or config.address is not None:
            serve_replicas(request, config)
        else:
            serve(request)
    except (ConfigError, CheckpointError, WeightsNotFoundError, ValueError, FileNotFoundError) as err:
        print(f"vlforge serve: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM while draining, or one while replicas start
        print("vlforge serve: stopped", file=sys.stderr)
        return 130
    return 0
