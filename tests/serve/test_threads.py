"""Only the model's worker runs torch's CPU operators in parallel: it keeps its count of CPU threads
whatever other threads set, request threads prepare images on themselves alone, the warm-up runs on
the worker, and the model is loaded by a thread that ends."""
from __future__ import annotations

import threading
from typing import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

import vlforge.serve.app as app_module
import vlforge.serve.server as server_module
import vlforge.serve.state as state_module
from tests.serve.conftest import chat_body, png_data_uri
from vlforge.serve.server import ServeRequest, build_app
from vlforge.serve.threads import in_thread_of_its_own, own_cpu_threads, serial_cpu_ops


@pytest.fixture(autouse=True)
def default_count_restored() -> Iterator[int]:
    """The process's count, put back as the default of new threads (serial_cpu_ops changes it)."""
    count = torch.get_num_threads()
    yield count
    in_thread_of_its_own(torch.set_num_threads, count)


def _parallel_operator() -> None:
    torch.ones(1 << 20).sum()  # large enough that torch runs it in parallel


def test_the_worker_keeps_its_count_when_another_thread_goes_serial_before_its_first_operator(
        default_count_restored: int) -> None:
    if default_count_restored < 2:
        pytest.skip("one CPU thread: nothing to keep")
    owned, serial_done, seen = threading.Event(), threading.Event(), {}

    def worker() -> None:
        own_cpu_threads(2)
        owned.set()
        serial_done.wait(30)
        _parallel_operator()  # torch's first use in this thread: it must not reset the count
        seen["worker"] = torch.get_num_threads()

    def request_thread() -> None:
        owned.wait(30)
        serial_cpu_ops()
        _parallel_operator()
        seen["request"] = torch.get_num_threads()
        serial_done.set()

    threads = [threading.Thread(target=worker), threading.Thread(target=request_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert seen == {"worker": 2, "request": 1}
    assert torch.get_num_threads() == default_count_restored  # this thread's own count is untouched
    fresh = threading.Thread(target=lambda: seen.update(fresh=torch.get_num_threads()))
    fresh.start()
    fresh.join(30)
    assert seen["fresh"] == 1  # ... a new thread takes the serial default
    assert in_thread_of_its_own(torch.get_num_threads) == default_count_restored  # ... but not a loader


def test_in_thread_of_its_own_gives_the_result_or_the_exception_from_a_thread_that_has_ended() -> None:
    threads: list[threading.Thread] = []

    def note(value: int) -> int:
        threads.append(threading.current_thread())
        return value * 2

    assert in_thread_of_its_own(note, 21) == 42
    assert threads[0] is not threading.current_thread() and not threads[0].is_alive()

    def fail() -> None:
        raise KeyError("model.vision.name")

    with pytest.raises(KeyError, match="model.vision.name"):
        in_thread_of_its_own(fail)


def test_a_served_model_is_loaded_warmed_and_fed_by_the_threads_meant_for_it(
        exports, monkeypatch: pytest.MonkeyPatch, default_count_restored: int) -> None:
    seen: dict[str, object] = {}

    def load(request):
        seen["load"] = threading.current_thread()
        return original_load(request)

    def warm(service):
        seen["warm"] = (threading.current_thread().name, torch.get_num_threads())
        return original_warm(service)

    def image(*args):
        seen["image"] = (threading.current_thread().name, torch.get_num_threads())
        return original_image(*args)

    original_load, original_warm, original_image = (server_module.load_served_model, app_module.warm_up,
                                                    state_module.load_image)
    monkeypatch.setattr(server_module, "load_served_model", load)
    monkeypatch.setattr(app_module, "warm_up", warm)
    monkeypatch.setattr(state_module, "load_image", image)
    in_thread_of_its_own(serial_cpu_ops)  # new threads default to one, as after another server's requests
    app, _ = build_app(ServeRequest(checkpoint=str(exports("caption"))))
    assert seen["load"] is not threading.current_thread() and not seen["load"].is_alive()
    with TestClient(app) as client:
        assert seen["warm"] == ("vlforge-scheduler", default_count_restored)
        response = client.post("/v1/chat/completions", json=chat_body(png_data_uri(), max_tokens=3))
        assert response.status_code == 200, response.text
    assert seen["image"][0] != "vlforge-scheduler" and seen["image"][1] == 1
