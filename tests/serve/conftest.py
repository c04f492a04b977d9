"""Tiny exported models (one per family the server exposes), shared by the serving tests, and a client
on the app in this process (its lifespan: scheduler started, model warmed up)."""
from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from tests.gloo import free_port
from tests.tiny_recipes import build_tiny, save_tokenizer
from vlforge.hub.export import export_model
from vlforge.serve.server import ServeRequest, build_app

RECIPES = {"caption": "blip_caption_demo", "blip2": "blip2_caption_demo", "llava": "llava_finetune_demo",
           "vqa": "blip_vqa_demo", "clip": "clip_demo", "retrieval": "blip_retrieval_demo"}


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`exports(kind)`: the export directory of a tiny random model of that kind, made once."""
    root = tmp_path_factory.mktemp("serve_models")
    tokenizer = save_tokenizer(root / "tokenizer")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            model, cfg = build_tiny(RECIPES[kind], tokenizer)
            export_model(model, cfg, root / kind)
            made[kind] = root / kind
        return made[kind]

    return get


def png_data_uri(seed: int = 0, size: int = 64, fmt: str = "PNG") -> str:
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(uri: str, text: str | None = None, **fields) -> dict:
    content = [{"type": "image_url", "image_url": {"url": uri}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture(scope="session")
def caption_client(exports) -> Iterator[TestClient]:
    app, _ = build_app(ServeRequest(checkpoint=str(exports("caption"))))
    with TestClient(app) as client:
        yield client


def client_for(exports, kind: str, *overrides: str) -> TestClient:
    app, _ = build_app(ServeRequest(checkpoint=str(exports(kind)), overrides=list(overrides)))
    return TestClient(app)


class LiveServer:
    """The app under a real uvicorn server on a free port, in a thread of this process."""

    def __init__(self, app) -> None:
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.server
