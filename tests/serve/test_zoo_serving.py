"""`vlforge serve NAME:TYPE`: a zoo model from the local cache, served under its zoo name, its captions
those of the model `load_model` gives."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from transformers import BlipForConditionalGeneration

from tests.hub.test_load import save_hf_model
from tests.serve.conftest import png_data_uri
from vlforge import load_model
from vlforge.serve.server import ServeRequest, build_app


def test_a_zoo_model_is_served_by_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    save_hf_model(BlipForConditionalGeneration, tmp_path / "home" / "models" / "blip_caption" / "base_coco")
    app, _ = build_app(ServeRequest(model="blip_caption:base_coco"))
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "blip_caption:base_coco"
        uri = png_data_uri(4, size=48)
        reply = client.post("/v1/caption", json={"image": uri, "max_tokens": 5, "num_beams": 2})
        assert reply.status_code == 200, reply.text
    model = load_model("blip_caption", "base_coco")
    image = app.state.server.service.transform(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    prompt = len(model.prompt_ids())
    with torch.no_grad():
        expected = model.generate({"image": image[None]}, num_beams=2, max_length=prompt + 5, min_length=prompt)
    assert reply.json()["choices"][0]["text"] == expected[0]
