"""Serving throughput and latency, `vlforge serve`'s app over HTTP on this machine, three schedulers
side by side in one run: (a) one request at a time, (b) request-level batching (a batch decodes to its
end before the next starts), (c) continuous batching (requests join the running batch at the next
decode step). Each model is served by the same app under uvicorn in this process; clients are
asyncio tasks keeping `concurrency` requests in flight until `requests` are answered.

Models (random weights: the work per token is what matters, and every caption runs to max_tokens
because the end token is never likelier than the others):
- BLIP-base caption: the `blip_caption_base` recipe (ViT-B/16 at 384 px, BERT-base decoder), 20 tokens.
- LLaVA-style: a CLIP ViT-B/16 tower at 224 px, LLaVA 1.5's projector and a 6-layer Llama of width 1024,
  128 tokens (an assistant's answer).

Targets: (c) >= 4x (a) in requests/s at concurrency 32, and (c)'s p99 latency at 32 below (b)'s.

With `--replicas 1 2`, replicas instead, each setting a `vlforge serve` process of its own on the
model's export: one uvicorn process (the default), then Ray Serve with each count of replicas behind
Ray's proxy, the machine's CPUs (or GPUs, with `--device cuda`) split evenly among them.

    python benchmarks/serve.py [--models blip llava] [--concurrency 1 8 32] [--max-tokens N] [--quant int8]
    python benchmarks/serve.py --models llava --concurrency 32 --replicas 1 2 [--device cuda]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import environment, setup_cpu  # noqa: E402

from tests.gloo import free_port  # noqa: E402
from tests.serve.conftest import LiveServer  # noqa: E402
from tests.tiny_recipes import build_tiny, save_tokenizer  # noqa: E402
from vlforge.config.serve import serve_config  # noqa: E402
from vlforge.hub.export import export_model  # noqa: E402
from vlforge.hub.placement import apply_quant  # noqa: E402
from vlforge.serve.server import app_for_model  # noqa: E402
from vlforge.serve.threads import in_thread_of_its_own  # noqa: E402

MODES = {
    "(a) one at a time": {"policy": "continuous", "max_running": 1, "max_batch_size": 1},
    "(b) request-level batching": {"policy": "request", "max_running": 32, "max_batch_size": 32},
    "(c) continuous batching": {"policy": "continuous", "max_running": 32, "max_batch_size": 32},
}

LLAVA_LM = ["model.language_model.config.hidden_size=1024", "model.language_model.config.intermediate_size=2816",
            "model.language_model.config.num_hidden_layers=6", "model.language_model.config.num_attention_heads=16",
            "model.language_model.config.num_key_value_heads=16", "model.language_model.config.vocab_size=32000",
            "model.language_model.config.max_position_embeddings=1024"]
MODELS = {
    # (recipe, overrides, image size, vocabulary size, chat text, tokens per answer: a caption is short,
    # an assistant's answer long)
    "blip": ("blip_caption_demo", ["model=blip_caption_base", "data.eval_image.size=384", "data.train_image.size=384"],
             384, 30524, None, 20),
    "llava": ("llava_finetune_demo", ["model.vision.name=vit_base_patch16_clip_224",
                                      "data.eval_image.size=224", "data.train_image.size=224", *LLAVA_LM],
              224, 32000, "what is in the image ?", 128),
}


def data_uri(seed: int, size: int) -> str:
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


async def load(url: str, bodies: list[dict], concurrency: int,
               served_by: collections.Counter | None = None) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, completion tokens) of answering every body; `served_by`
    counts the answers per replica (x-vlforge-replica)."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]
            if served_by is not None:
                served_by[response.headers.get("x-vlforge-replica", "process")] += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, tokens


def profile(model: torch.nn.Module, size: int, text: str | None) -> str:
    """Where a request's time goes, the model called directly: the prefill (image encode + prompt) per
    image at batch 1 and 8, and one decode step at 1 and 32 rows (medians of 3)."""
    from vlforge.models.layers.decode_rows import DecodeRows

    setup_cpu()  # per thread

    def median_time(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    image = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        prefill_1 = median_time(lambda: model.start_rows(image[:1], [text]))
        prefill_8 = median_time(lambda: model.start_rows(image, [text] * 8)) / 8
        started = model.start_rows(image[:1], [text])
        rows_32 = DecodeRows.concat([started.rows.select(torch.zeros(32, dtype=torch.long))])
        next_ids = started.logits.argmax(-1)

        def step_time(rows: DecodeRows, count: int) -> float:
            copies = [DecodeRows(rows.growing, rows.fixed, rows.key_mask, rows.positions) for _ in range(3)]
            return median_time(lambda: model.step_rows(copies.pop(), next_ids.expand(count)))

        step_1, step_32 = step_time(started.rows, 1), step_time(rows_32, 32)
    return (f"Profile (model called directly): prefill {prefill_1:.3f} s per image at batch 1, {prefill_8:.3f} s "
            f"per image at batch 8; a decode step {step_1 * 1000:.0f} ms at 1 row, {step_32 * 1000:.0f} ms at 32 rows "
            f"({step_32 / 32 * 1000:.1f} ms per row).\n")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) > 1 else values[0]


def bench_model(key: str, concurrencies: list[int], max_tokens: int | None, tokenizer_dir: Path,
                quant: str = "none") -> list[str]:
    recipe, overrides, size, vocab, text, default_tokens = MODELS[key]
    max_tokens = max_tokens or default_tokens
    save_tokenizer(tokenizer_dir, size=vocab)

    def build() -> tuple[torch.nn.Module, object]:
        model, cfg = build_tiny(recipe, tokenizer_dir, overrides=overrides)
        if quant != "none":  # as `load_model(quant=...)` / `serve.quantize` hold it
            apply_quant(model, quant)
        return model, cfg

    # Built and profiled as `vlforge serve` loads: by threads that end (vlforge/serve/threads.py).
    model, cfg = in_thread_of_its_own(build)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows = [f"\n### {key}: {recipe} with {' '.join(overrides)} ({params:.0f}M parameters, {size} px, "
            f"{max_tokens} tokens per request, quant {quant})\n",
            "| scheduler | concurrency | requests | requests/s | tokens/s | p50 latency (s) | p99 latency (s) |",
            "|---|---|---|---|---|---|---|"]
    rows.append(in_thread_of_its_own(profile, model, size, text))
    print(rows[-1], flush=True)
    results: dict[tuple[str, int], float] = {}
    p99: dict[tuple[str, int], float] = {}
    for mode, batching in MODES.items():
        config = serve_config({"batching": {**batching, "request_timeout_s": 3600},
                               "limits": {"max_tokens": max_tokens, "default_max_tokens": max_tokens}})
        app = app_for_model(model, cfg, config, key)
        with LiveServer(app) as server:
            for concurrency in concurrencies:
                count = max(concurrency, 4)
                bodies = chat_bodies(count, size, text, max_tokens)
                asyncio.run(load(server.url, bodies[:1], 1))  # warm the connection and this batch size's path
                wall, latencies, tokens = asyncio.run(load(server.url, bodies, concurrency))
                results[(mode, concurrency)] = count / wall
                p99[(mode, concurrency)] = percentile(latencies, 99)
                rows.append(f"| {mode} | {concurrency} | {count} | {count / wall:.3f} | {tokens / wall:.1f} | "
                            f"{statistics.median(latencies):.2f} | {p99[(mode, concurrency)]:.2f} |")
                print(rows[-1], flush=True)
    top = max(concurrencies)
    a, b, c = (results[(m, top)] for m in MODES)
    pa, pb, pc = (p99[(m, top)] for m in MODES)
    rows.append(f"\nAt concurrency {top}: (c) / (a) throughput **{c / a:.2f}x** (target >= 4x), (c) / (b) "
                f"{c / b:.2f}x; p99 (c) {pc:.2f} s against (b) {pb:.2f} s "
                f"({'below' if pc < pb else 'NOT below'}), (a) {pa:.2f} s.")
    return rows


def chat_bodies(count: int, size: int, text: str | None, max_tokens: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": [
        *([{"type": "text", "text": text}] if text else []),
        {"type": "image_url", "image_url": {"url": data_uri(i, size)}}]}],
        "temperature": 0, "max_tokens": max_tokens, "min_tokens": max_tokens} for i in range(count)]


def wait_ready(url: str, proc: subprocess.Popen, replicas: int, timeout: float = 600) -> None:
    """Until `replicas` distinct replicas (one process: its /readyz) answer."""
    deadline, seen = time.monotonic() + timeout, set()
    while len(seen) < replicas:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vlforge serve did not become ready (exit {proc.poll()})")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=5)
            if ready.status_code == 200:
                seen.add(ready.json()["replica"] or "process")
                continue
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process and its descendants, summed by process name (Ray names
    its workers: ray::ServeReplica..., ray::ProxyActor, raylet, gcs_server)."""
    totals: dict[str, float] = collections.defaultdict(float)
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times, name = process.cpu_times(), process.name()
        except psutil.NoSuchProcess:
            continue
        totals[name] += times.user + times.system
    return dict(totals)


def bench_replicas(key: str, counts: list[int], concurrency: int, max_tokens: int | None, tmp: Path,
                   device: str) -> list[str]:
    recipe, overrides, size, vocab, text, default_tokens = MODELS[key]
    max_tokens = max_tokens or default_tokens
    model, cfg = build_tiny(recipe, save_tokenizer(tmp / f"tok_{key}", size=vocab), overrides=overrides)
    export_model(model, cfg, tmp / key)
    del model
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count() if device == "cuda" else 0
    requests = 2 * concurrency
    rows = [f"\n### {key} replicas: {recipe}, {max_tokens} tokens per request, {requests} requests at concurrency "
            f"{concurrency}, {cpus} CPUs{f', {gpus} GPUs' if gpus else ''}\n",
            "| server | requests/s | tokens/s | p50 latency (s) | p99 latency (s) |", "|---|---|---|---|---|"]
    settings = [("one process (uvicorn)", 1, [])]
    for n in counts:
        share = [f"serve.cpus_per_replica={cpus / n:g}", f"serve.gpus_per_replica={gpus / n:g}"]
        settings.append((f"Ray Serve, {n} replica{'s' if n > 1 else ''}", n, ["serve.address=local", f"serve.replicas={n}", *share]))
    throughput, profiles = {}, []
    for label, replicas, keys in settings:
        port = free_port()
        command = [str(Path(sys.executable).parent / "vlforge"), "serve", f"checkpoint={tmp / key}", f"serve.port={port}",
                   f"serve.device={device}", "serve.batching.request_timeout_s=3600", f"serve.limits.max_tokens={max_tokens}",
                   f"serve.batching.max_queue={requests}", *keys]
        with open(tmp / "serve.log", "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, replicas)
            asyncio.run(load(url, chat_bodies(2 * replicas, size, text, max_tokens), 2 * replicas))  # warm every replica
            before, served_by = cpu_seconds(proc.pid), collections.Counter()
            wall, latencies, tokens = asyncio.run(load(url, chat_bodies(requests, size, text, max_tokens), concurrency,
                                                       served_by))
            used = {name: seconds - before.get(name, 0.0) for name, seconds in cpu_seconds(proc.pid).items()}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        throughput[label] = requests / wall
        rows.append(f"| {label} | {requests / wall:.3f} | {tokens / wall:.1f} | {statistics.median(latencies):.2f} | "
                    f"{percentile(latencies, 99):.2f} |")
        print(rows[-1], flush=True)
        profiles.append(f"- {label}: answers per replica {sorted(served_by.values(), reverse=True)}; CPU seconds in the "
                        f"run ({wall:.0f} s x {cpus} CPUs = {wall * cpus:.0f}): "
                        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(used.items(), key=lambda x: -x[1])
                                    if seconds >= 0.1))
        print(profiles[-1], flush=True)
    rows += ["\nProfile:", *profiles]
    base = throughput[settings[0][0]]
    rows.append("\n" + "; ".join(f"{label}: {value / base:.2f}x one process" for label, value in throughput.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default: 20 for blip, 128 for llava)")
    parser.add_argument("--replicas", nargs="+", type=int, default=None,
                        help="compare one process with Ray Serve at these replica counts (at the top concurrency)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="with --replicas: where replicas run")
    parser.add_argument("--quant", default="none", choices=["none", "int8", "bf16"],
                        help="hold the served model as load_model(quant=...) does (not with --replicas)")
    args = parser.parse_args()
    setup_cpu()
    print(environment())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            if args.replicas:
                out += bench_replicas(key, args.replicas, max(args.concurrency), args.max_tokens, Path(tmp), args.device)
            else:
                out += bench_model(key, args.concurrency, args.max_tokens, Path(tmp) / f"tok_{key}", args.quant)
    print("\n".join(out))


if __name__ == "__main__":
    main()
