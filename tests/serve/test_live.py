"""Over real HTTP (uvicorn): the openai client, streaming and not; 32 concurrent requests under
continuous batching, each exactly its output alone; a client that disconnects mid-stream frees its
slot within a step."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from tests.serve.conftest import LiveServer, chat_body, png_data_uri
from vlforge.serve.server import ServeRequest, build_app


@pytest.fixture(scope="module")
def llava_server(exports):
    app, _ = build_app(ServeRequest(checkpoint=str(exports("llava"))))
    with LiveServer(app) as server:
        yield server


def test_openai_client_streaming_and_not(llava_server: LiveServer) -> None:
    client = OpenAI(base_url=f"{llava_server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llava_finetune_demo"]
    messages = chat_body(png_data_uri(7), "what colour is the shape ?")["messages"]
    whole = client.chat.completions.create(model="llava_finetune_demo", messages=messages, temperature=0, max_tokens=12)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="llava_finetune_demo", messages=messages, temperature=0,
                                                 max_tokens=12, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) >= 2
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    sampled = [client.chat.completions.create(model="llava_finetune_demo", messages=messages, temperature=0.8,
                                              top_p=0.9, seed=11, max_tokens=8, n=2) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]


def test_32_concurrent_requests_each_get_their_output_alone(llava_server: LiveServer) -> None:
    questions = ["what colour is the shape ?", "what shape is on the left ?", "is it red ?", "a"]
    bodies = [chat_body(png_data_uri(i % 8), questions[i % 4], temperature=0, max_tokens=4 + i % 9) for i in range(32)]
    alone = [httpx.post(f"{llava_server.url}/v1/chat/completions", json=b, timeout=60).json() for b in bodies]
    joined_before = llava_server.state.metrics.joined_running._value.get()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: httpx.post(f"{llava_server.url}/v1/chat/completions", json=b, timeout=60), bodies))
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.status_code == 200, t.text
        assert t.json()["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"], i
    assert llava_server.state.metrics.joined_running._value.get() > joined_before  # batches were joined running


def test_a_client_that_disconnects_mid_stream_frees_its_slot(llava_server: LiveServer) -> None:
    model = llava_server.state.service.stepwise
    original = model.step_rows

    def slow_step(rows, next_ids):
        time.sleep(0.02)
        return original(rows, next_ids)

    model.step_rows = slow_step  # the instance attribute the scheduler calls
    try:
        body = chat_body(png_data_uri(1), "a", temperature=0, max_tokens=200, min_tokens=200, stream=True)
        with httpx.stream("POST", f"{llava_server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            received = 0
            for line in lines:
                received += line.startswith("data: ")
                if received >= 4:
                    break
            assert llava_server.state.scheduler.running == 1
        closed = time.monotonic()
        while llava_server.state.scheduler.running and time.monotonic() < closed + 3:
            time.sleep(0.01)
        # Freed long before its 200 tokens (4 s at 20 ms a step) were done: the server noticed the
        # disconnect (it polls every 0.25 s) and the row left at the next step.
        assert llava_server.state.scheduler.running == 0
        assert time.monotonic() - closed < 1.0
    finally:
        del model.step_rows
