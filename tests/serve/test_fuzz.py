"""Malformed input never gets a 5xx and never takes the server down: schemathesis against the served
OpenAPI schema (valid and invalid data for every operation), and 1,000 hand-made malformed requests
(bad JSON, wrong types, broken, oversized and bomb images, wrong content types, oversized bodies)."""
from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from collections import Counter

import httpx
import hypothesis
import hypothesis.errors
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis import GenerationMode

from tests.serve.conftest import LiveServer, chat_body, png_data_uri
from vlforge.serve.server import ServeRequest, build_app

LIMITS = ["serve.limits.max_body_bytes=2000000", "serve.limits.max_image_bytes=1000000",
          "serve.limits.max_image_pixels=1000000"]


@pytest.fixture(scope="module")
def server(exports):
    app, _ = build_app(ServeRequest(checkpoint=str(exports("caption")), overrides=LIMITS))
    with LiveServer(app) as live:
        yield live


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.fixture
def subnormal_floats():
    """hypothesis draws subnormal floats, which this thread flushes to zero (tests/conftest.py)."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


def test_schemathesis_finds_no_server_error(server: LiveServer, subnormal_floats) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis.given(operation.as_strategy(generation_mode=mode))
            @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def call(case) -> None:
                response = case.call(base_url=server.url, timeout=30)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{operation.label}: {response.status_code} {response.text[:200]}")

            try:
                call()
            except hypothesis.errors.Unsatisfiable:  # an operation with no input has no invalid form
                assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
    print(f"schemathesis: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, failures[:5]
    assert sum(statuses.values()) >= 500
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def _png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (grey, 8 bits) with rows of zeros: tiny on disk, a
    bomb when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * ((width + 1) * height), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _malformed(rng: random.Random, good_png: bytes) -> tuple[str, str, bytes, dict[str, str]]:
    """(category, path, body, headers) of one malformed request."""
    json_headers = {"content-type": "application/json"}
    path = rng.choice(["/v1/chat/completions", "/v1/caption", "/v1/vqa", "/v1/classify", "/v1/embeddings", "/v1/match"])
    kind = rng.randrange(9)
    if kind == 0:  # not JSON at all, or cut short
        body = rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))),
                           json.dumps(chat_body("data:,")).encode()[: rng.randrange(1, 40)], b"", b"null", b"[]"])
        return "bad json", path, body, json_headers
    if kind == 1:  # the endpoint's own keys with values of no type they take
        key = rng.choice(FIELDS[path])
        value = rng.choice([{"nested": [1]}, [{"a": 1}]])
        return "wrong type", path, json.dumps({**_with_image(path, png_data_uri(0)), key: value}).encode(), json_headers
    if kind == 2:  # broken image bytes
        broken = rng.choice([good_png[: rng.randrange(8, len(good_png) // 2)],  # cut inside the pixel data
                             bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 500))),
                             good_png[:40] + bytes(rng.getrandbits(8) for _ in range(200)), b"GIF89a" + b"\x00" * 30])
        return "broken image", path, json.dumps(_with_image(path, _uri(broken))).encode(), json_headers
    if kind == 3:  # bad base64, bad URIs, remote URLs
        url = rng.choice(["data:image/png;base64,@@@@", "data:image/png,notbase64", "data:text/plain;base64,aGVsbG8=",
                          "http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "", "data:",
                          "data:image/png;base64," + "A" * rng.randrange(1, 7)])
        return "bad uri", path, json.dumps(_with_image(path, url)).encode(), json_headers
    if kind == 4:  # decompression bombs: the header says more pixels than allowed
        side = rng.choice([1200, 2000, 4000])
        return "bomb", path, json.dumps(_with_image(path, _uri(_png(side, side)))).encode(), json_headers
    if kind == 5:  # an image over the byte limit (the body stays under the body limit)
        big = _uri(b"\x89PNG" + b"\x00" * 1_200_000)
        return "oversized image", path, json.dumps(_with_image(path, big)).encode(), json_headers
    if kind == 6:  # a body over the body limit
        return "oversized body", path, b'{"image": "' + b"A" * 2_100_000 + b'"}', json_headers
    if kind == 7:  # wrong content types
        content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
        return "content type", path, json.dumps(chat_body(png_data_uri(0))).encode(), {"content-type": content_type}
    field, value = rng.choice(OUT_OF_RANGE[path])
    return "out of range", path, json.dumps({**_with_image(path, png_data_uri(0)), field: value}).encode(), json_headers


FIELDS = {
    "/v1/chat/completions": ["messages", "temperature", "max_tokens", "n", "stop", "seed", "top_p", "stream"],
    "/v1/caption": ["image", "temperature", "max_tokens", "n", "stop", "seed", "num_beams", "stream", "top_p"],
    "/v1/vqa": ["image", "question", "mode", "max_tokens", "num_beams", "answers"],
    "/v1/classify": ["image", "labels", "templates", "top_k"],
    "/v1/embeddings": ["input", "encoding_format"],
    "/v1/match": ["image", "texts"],
}
_SAMPLING = [("max_tokens", 10**9), ("n", 10**6), ("temperature", 7), ("top_p", 0), ("stop", ["a"] * 9),
             ("min_tokens", 10**6), ("top_k", -5), ("presence_penalty", 1.0), ("repetition_penalty", 0)]
OUT_OF_RANGE = {
    "/v1/chat/completions": _SAMPLING,
    "/v1/caption": [*_SAMPLING, ("num_beams", 99)],
    "/v1/vqa": [("num_beams", 99), ("max_tokens", 0), ("mode", "guess"), ("question", "")],
    "/v1/classify": [("labels", []), ("top_k", 0), ("templates", ["no placeholder"]), ("labels", [""])],
    "/v1/embeddings": [("input", []), ("encoding_format", "int8"), ("input", [""])],
    "/v1/match": [("texts", []), ("texts", [" "])],
}


def _with_image(path: str, url: str) -> dict:
    if path == "/v1/chat/completions":
        return chat_body(url, "what is it ?")
    if path == "/v1/embeddings":
        return {"input": [{"type": "image_url", "image_url": {"url": url}}]}
    return {"image": url, "question": "what ?", "labels": ["a", "b"], "texts": ["a"]}


def test_a_thousand_malformed_requests_get_4xx_and_the_server_stays_well(server: LiveServer) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    good_png = buffer.getvalue()  # noise: the pixel data is most of the file
    rng = random.Random(0)
    by_category: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/v1/caption", json={"image": png_data_uri(0), "max_tokens": 2})
        rss_start = _rss_mib()
        for _ in range(1000):
            category, path, body, headers = _malformed(rng, good_png)
            response = client.post(path, content=body, headers=headers)
            by_category[category] += 1
            statuses[response.status_code] += 1
            if not 400 <= response.status_code < 500:
                bad.append(f"{category} {path}: {response.status_code} {response.text[:200]}")
            elif response.headers.get("content-type", "").startswith("application/json"):
                assert "message" in response.json()["error"], response.text
        rss_end = _rss_mib()
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/caption", json={"image": png_data_uri(0), "max_tokens": 2}).status_code == 200
    print(f"fuzz: {sum(by_category.values())} requests {dict(by_category)}; statuses {dict(sorted(statuses.items()))}; "
          f"RSS {rss_start:.0f} -> {rss_end:.0f} MiB")
    assert not bad, bad[:5]
    assert set(by_category) >= {"bad json", "wrong type", "broken image", "bomb", "oversized body", "content type"}
    assert rss_end - rss_start < 200  # bombs were never decoded, bodies never held whole twice
