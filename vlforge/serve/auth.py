"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time against the keys of an
environment variable (comma-separated) and/or a file (one per line). No keys configured: no check."""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Request

from vlforge.config.serve import ServeConfig
from vlforge.core.errors import ConfigError
from vlforge.serve.errors import APIError


def load_api_keys(config: ServeConfig) -> tuple[bytes, ...]:
    keys = [k.strip() for k in os.environ.get(config.api_keys_env, "").split(",")]
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"serve.api_keys_file={path}: no such file")
        from_file = [line.strip() for line in path.read_text().splitlines()]
        if not any(k and not k.startswith("#") for k in from_file):
            raise ConfigError(f"serve.api_keys_file={path} holds no key: the server would run without keys")
        keys += from_file
    return tuple(k.encode() for k in keys if k and not k.startswith("#"))


def check_api_key(request: Request) -> None:
    """The dependency every endpoint but /healthz has."""
    keys: tuple[bytes, ...] = request.app.state.server.api_keys
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "an API key is required: send 'Authorization: Bearer <key>'", "authorization",
                       {"WWW-Authenticate": "Bearer"})
    candidate = given.strip().encode()
    # Compare with every key (no early exit), so the time taken says nothing about which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    if not matched:
        raise APIError(401, "the API key is not valid", "authorization", {"WWW-Authenticate": "Bearer"})
