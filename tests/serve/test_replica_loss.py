"""What Ray's proxy answers when a replica dies under a request (vlforge.serve.replica_loss), and the
Ray Serve deployment options read from the serve config, without starting Ray (the replicas
themselves run in tests/e2e/test_serve_replicas.py)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from vlforge.config.serve import serve_config
from vlforge.core.errors import ConfigError
from vlforge.serve.replica_loss import PROXY_ANSWERS, REPLICA_LOST, ReplicaLossAs503, proxy_middlewares
from vlforge.serve.replicas import ModelReplica, deployment_options
from vlforge.serve.server import ServeRequest


def _proxy(*messages: dict, fail: bool = False):
    """A stand-in for Ray's proxy app: sends `messages`, then returns (or raises, as a lost replica may)."""

    async def app(scope, receive, send) -> None:
        for message in messages:
            await send(message)
        if fail:
            raise RuntimeError("ActorDiedError")

    return TestClient(ReplicaLossAs503(app))


def _start(status: int, content_type: bytes) -> dict:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}


def _assert_replica_lost(response) -> None:
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"error": {"message": REPLICA_LOST, "type": "service_unavailable", "param": None,
                                         "code": 503}}


@pytest.mark.parametrize("fail", [False, True])
def test_a_request_the_proxy_never_answered_gets_a_503(fail: bool) -> None:
    _assert_replica_lost(_proxy(fail=fail).post("/v1/caption", json={}))


def test_the_proxys_plain_500_becomes_a_503() -> None:
    client = _proxy(_start(500, b"text/plain; charset=utf-8"),
                    {"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})
    _assert_replica_lost(client.post("/v1/caption", json={}))


@pytest.mark.parametrize("status, body", [(404, b"Path '/v1/caption' not found."),  # not deployed, or draining
                                          (503, b"Request dropped due to backpressure")])  # every queue full
def test_the_proxys_plain_404_and_503_become_a_json_503(status: int, body: bytes) -> None:
    client = _proxy(_start(status, b"text/plain; charset=utf-8"), {"type": "http.response.body", "body": body})
    response = client.post("/v1/caption", json={})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"] == {"message": PROXY_ANSWERS[status], "type": "service_unavailable",
                                        "param": None, "code": 503}
    own_404 = _proxy(_start(404, b"application/json"), {"type": "http.response.body", "body": b'{"error": {}}'})
    assert own_404.get("/v1/models/other").status_code == 404  # the app's own 404 is the model's answer


def test_the_apps_own_answers_pass_untouched() -> None:
    body = json.dumps({"error": {"message": "internal error: boom", "code": 500}}).encode()
    own_500 = _proxy(_start(500, b"application/json"), {"type": "http.response.body", "body": body})
    answer = own_500.post("/v1/caption", json={})
    assert answer.status_code == 500 and answer.json()["error"]["message"] == "internal error: boom"
    ok = _proxy(_start(200, b"application/json"), {"type": "http.response.body", "body": b'{"caption": "a"}'})
    assert ok.get("/").json() == {"caption": "a"}


def test_a_stream_cut_off_mid_way_ends_with_a_503_event() -> None:
    first = b'data: {"choices": [{"text": "a"}]}\n\n'
    client = _proxy(_start(200, b"text/event-stream"), {"type": "http.response.body", "body": first, "more_body": True},
                    fail=True)
    response = client.post("/v1/caption", json={})
    assert response.status_code == 200
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0] == '{"choices": [{"text": "a"}]}' and events[-1] == "[DONE]"
    assert json.loads(events[1])["error"] == {"message": REPLICA_LOST, "type": "service_unavailable", "param": None,
                                              "code": 503}
    complete = _proxy(_start(200, b"text/event-stream"),
                      {"type": "http.response.body", "body": first + b"data: [DONE]\n\n", "more_body": False})
    assert complete.post("/v1/caption", json={}).text == (first + b"data: [DONE]\n\n").decode()


def test_ray_loads_the_middleware_by_its_import_path() -> None:
    from vlforge.serve.replica_loss import PROXY_CALLBACK

    module, _, name = PROXY_CALLBACK.rpartition(".")
    loaded = getattr(__import__(module, fromlist=[name]), name)
    assert loaded is proxy_middlewares and proxy_middlewares()[0].cls is ReplicaLossAs503


def test_deployment_options_give_one_device_per_replica_where_the_cluster_has_them() -> None:
    config = serve_config({"replicas": 3, "cpus_per_replica": 2, "graceful_shutdown_s": 12,
                           "batching": {"max_running": 8, "max_queue": 20}})
    on_gpus, on_cpus = deployment_options(config, cluster_gpus=4), deployment_options(config, cluster_gpus=0)
    assert on_gpus["num_replicas"] == 3 and on_gpus["graceful_shutdown_timeout_s"] == 12
    assert on_gpus["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1.0}
    assert on_cpus["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.0}
    # Ray may hand a replica what its own queue holds: its scheduler, not Ray's routing, bounds the batch.
    assert on_gpus["max_ongoing_requests"] == 28 and on_gpus["max_queued_requests"] == 20
    assert deployment_options(serve_config({"device": "cpu"}), 4)["ray_actor_options"]["num_gpus"] == 0.0
    assert deployment_options(serve_config({"gpus_per_replica": 2}), 4)["ray_actor_options"]["num_gpus"] == 2
    with pytest.raises(ConfigError, match="set serve.gpus_per_replica"):
        deployment_options(serve_config({"device_map": "auto"}), 4)  # how many GPUs to spread over is the user's


def test_a_replica_whose_model_worker_died_reports_unhealthy(caption_client, monkeypatch: pytest.MonkeyPatch) -> None:
    replica = ModelReplica(ServeRequest(checkpoint="unused"))
    replica.check_health()  # before its app is built there is nothing to check
    replica.served = caption_client.app
    replica.check_health()
    monkeypatch.setattr(type(caption_client.app.state.server.scheduler), "alive", property(lambda self: False))
    with pytest.raises(RuntimeError, match="model worker of this replica has stopped"):
        replica.check_health()  # Ray replaces a replica whose check_health raises
