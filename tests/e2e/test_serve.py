"""`vlforge serve` as users run it: a separate process serving an exported model; it answers once
/readyz says so, and SIGTERM lets a stream in flight finish before the process exits cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.gloo import free_port
from tests.serve.conftest import chat_body, png_data_uri
from tests.tiny_recipes import build_tiny, save_tokenizer
from vlforge.hub.export import export_model

BIN = Path(sys.executable).parent


def test_vlforge_serve_answers_and_drains_a_stream_on_sigterm(tmp_path: Path) -> None:
    model, cfg = build_tiny("llava_finetune_demo", save_tokenizer(tmp_path / "tokenizer"))
    export_model(model, cfg, tmp_path / "llava")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(BIN / "vlforge"), "serve", f"checkpoint={tmp_path / 'llava'}", f"serve.port={port}",
                             "serve.model_name=tiny-llava"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-llava"

        body = chat_body(png_data_uri(3), "what colour is the shape ?", model="tiny-llava", temperature=0,
                         max_tokens=200, min_tokens=200, stream=True)
        events, signalled = [], False
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if len(events) == 3 and not signalled:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                    signalled = True
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["choices"][0]["finish_reason"] == "length"  # all 200 tokens came after SIGTERM
        # uvicorn re-raises the signal it handled once shut down: an exit by SIGTERM, as a supervisor expects.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        output = proc.stdout.read().decode()
        assert "Shutting down" in output or "shutdown" in output.lower()
        try:
            httpx.get(f"{url}/healthz", timeout=2)
            raise AssertionError("the server still answers after its shutdown")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
