"""`vlforge serve ... serve.replicas=2` as users run it: two Ray Serve CPU replicas behind Ray's proxy
answer 200 requests (48 in flight at a time), both of them; one is killed mid-run and every accepted request still
gets an answer (its own, or a clear 503); Ray brings the deployment back to two replicas; SIGTERM
lets a stream in flight finish, then the deployment and the local Ray it started are gone."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.gloo import free_port
from tests.serve.conftest import png_data_uri
from tests.tiny_recipes import build_tiny, save_tokenizer
from vlforge.hub.export import export_model
from vlforge.serve.replica_loss import PROXY_ANSWERS, REPLICA_LOST

BIN = Path(sys.executable).parent
# A steady load (CONCURRENCY in flight until REQUESTS are answered), not one burst: Ray's router may
# hand a burst mostly to one replica, and the one killed must hold requests when it dies.
REQUESTS, CONCURRENCY, KILL_AFTER, TOKENS = 200, 48, 40, 60
EARLY_TOKENS = TOKENS // 4


def _wait_for_replicas(url: str, proc: subprocess.Popen, log: Path, count: int, exclude: str = "",
                       timeout: float = 180) -> dict[str, int]:
    """{replica id: pid} once `count` replicas (none of them `exclude`) answer /readyz."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        seen: dict[str, int] = {}
        try:
            for _ in range(12):
                ready = httpx.get(f"{url}/readyz", timeout=5)
                if ready.status_code == 200:
                    seen[ready.json()["replica"]] = ready.json()["pid"]
        except httpx.TransportError:
            pass
        if len(seen) == count and exclude not in seen:
            return seen
        assert time.monotonic() < deadline, f"{count} replicas did not become ready (saw {seen})"
        time.sleep(0.5)


async def _load(url: str, victim: str, victim_pid: int) -> list[dict]:
    """REQUESTS captions, CONCURRENCY at a time (every fourth streamed); the victim replica is SIGKILLed
    once it has answered and KILL_AFTER answers are in, at a moment one of its streams has sent fewer
    than EARLY_TOKENS of its tokens (a stream's headers, which name its replica, arrive before its
    tokens): Ray's router may leave a replica idle for a while, and a kill then would cut nothing; nor
    would a kill while the client still reads a stream the replica has finished sending."""
    done, victim_answered = 0, False
    early = collections.Counter()  # replica -> its streams with fewer than EARLY_TOKENS tokens read so far
    in_flight = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY + 10)) as client:

        async def one(i: int) -> dict:
            nonlocal done, victim_answered
            body = {"image": png_data_uri(i % 5), "max_tokens": TOKENS, "min_tokens": TOKENS, "stream": i % 4 == 0}
            async with in_flight, client.stream("POST", f"{url}/v1/caption", json=body) as response:
                if not body["stream"]:
                    text = (await response.aread()).decode()
                else:
                    replica, lines, events, is_early = response.headers.get("x-vlforge-replica"), [], 0, True
                    early[replica] += 1
                    try:
                        async for line in response.aiter_lines():
                            lines.append(line)
                            events += line.startswith("data: ")
                            if is_early and events >= EARLY_TOKENS:
                                early[replica], is_early = early[replica] - 1, False
                    finally:
                        early[replica] -= is_early
                    text = "\n".join(lines)
            done += 1
            victim_answered |= response.headers.get("x-vlforge-replica") == victim
            return {"stream": body["stream"], "status": response.status_code, "text": text,
                    "replica": response.headers.get("x-vlforge-replica"), "done_before": done - 1}

        async def kill() -> None:
            while (done < KILL_AFTER or not victim_answered or not early[victim]) and done < REQUESTS:
                await asyncio.sleep(0.002)
            os.kill(victim_pid, signal.SIGKILL)

        answers, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(REQUESTS))), kill())
    return answers


def _outcome(answer: dict) -> str:
    """served | lost (a clear 503), asserting the answer is one of the two."""
    if answer["status"] == 503:  # the replica's own loss, or none left to take it while Ray replaces it
        error = json.loads(answer["text"])["error"]
        assert error["message"] in PROXY_ANSWERS.values() and error["code"] == 503, answer
        return "lost"
    assert answer["status"] == 200, answer
    if not answer["stream"]:
        assert json.loads(answer["text"])["usage"]["completion_tokens"] == TOKENS
        return "served"
    events = [line[len("data: "):] for line in answer["text"].splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", answer  # a stream always ends, cut off or not
    last = json.loads(events[-2])
    if "error" in last:
        assert last["error"]["message"] == REPLICA_LOST and last["error"]["code"] == 503, answer
        return "lost"
    assert last["finish_reason"] == "length", answer
    return "served"


def test_two_replicas_balance_survive_a_killed_replica_and_drain_on_sigterm(tmp_path: Path) -> None:
    model, cfg = build_tiny("llava_finetune_demo", save_tokenizer(tmp_path / "tokenizer"))
    export_model(model, cfg, tmp_path / "llava")
    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "vlforge"), "serve", f"checkpoint={tmp_path / 'llava'}",
                                 "serve.replicas=2", f"serve.port={port}"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        replicas = _wait_for_replicas(url, proc, log, 2)
        victim_id, victim_pid = next(iter(replicas.items()))

        answers = asyncio.run(_load(url, victim_id, victim_pid))
        outcomes = [_outcome(a) for a in answers]
        served_by = collections.Counter(a["replica"] for a, o in zip(answers, outcomes) if o == "served")
        lost = outcomes.count("lost")
        print(f"\n{REQUESTS} requests, a replica SIGKILLed after its first answer and {KILL_AFTER} in all: served by "
              f"{dict(served_by)}, {lost} answered 503 (the killed replica's in-flight requests)")
        assert set(served_by) >= set(replicas)  # both replicas took requests through Ray's proxy
        assert lost >= 1 and served_by[victim_id] < REQUESTS - lost  # the kill landed mid-run

        killed_at = time.monotonic()
        recovered = _wait_for_replicas(url, proc, log, 2, exclude=victim_id)
        print(f"two replicas again after {time.monotonic() - killed_at:.1f} s: {sorted(recovered)}")
        assert httpx.post(f"{url}/v1/caption", json={"image": png_data_uri(0), "max_tokens": 3},
                          timeout=60).status_code == 200

        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert {"raylet", "gcs_server"} <= {p.name() for p in tree}  # the local Ray this command started
        body = {"image": png_data_uri(3), "max_tokens": 200, "min_tokens": 200, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/caption", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if len(events) == 3:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
        assert events[-1] == "[DONE]" and json.loads(events[-2])["finish_reason"] == "length"
        assert len(events) == 202  # all 200 tokens, most of them after SIGTERM
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_address_deploys_onto_a_running_cluster_and_leaves_it_running(tmp_path: Path) -> None:
    model, cfg = build_tiny("blip_caption_demo", save_tokenizer(tmp_path / "tokenizer"))
    export_model(model, cfg, tmp_path / "caption")
    gcs_port, port, log = free_port(), free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VLFORGE_API_KEYS")}
    # A cluster as docs/serving.md starts one: token authentication, the proxy's middleware named.
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="vlforge.serve.replica_loss.proxy_middlewares")
    # The cluster in a session of its own, so that only its processes are stopped at the end.
    cluster = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
                                "--include-dashboard=false", "--disable-usage-stats", "--block"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    proc = None
    try:
        # The key is the driver's alone: a replica on a cluster has neither its environment nor its files.
        with log.open("w") as out:
            proc = subprocess.Popen([str(BIN / "vlforge"), "serve", f"checkpoint={tmp_path / 'caption'}",
                                     f"serve.address=127.0.0.1:{gcs_port}", f"serve.port={port}"],
                                    env={**env, "VLFORGE_API_KEYS": "cluster-key"}, stdout=out, stderr=subprocess.STDOUT)
        url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer cluster-key"}
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/readyz", headers=key, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the replica did not become ready"
            time.sleep(0.5)
        body = {"image": png_data_uri(0), "max_tokens": 4}
        assert httpx.post(f"{url}/v1/caption", json=body, timeout=60).status_code == 401
        answer = httpx.post(f"{url}/v1/caption", json=body, headers=key, timeout=60)
        assert answer.status_code == 200 and answer.headers["x-vlforge-replica"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        # The application is gone; the cluster, and Ray Serve's proxy on it, are still up.
        gone = httpx.get(f"{url}/readyz", timeout=10)
        assert gone.status_code == 503 and gone.json()["error"]["message"] == PROXY_ANSWERS[404]
        assert cluster.poll() is None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        os.killpg(cluster.pid, signal.SIGTERM)
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, signal.SIGKILL)
