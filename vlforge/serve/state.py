"""What every route reads from `app.state.server`, and the bridge from the worker thread's events to a
request's coroutine."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from vlforge.config.serve import ServeConfig
from vlforge.serve.errors import APIError
from vlforge.serve.images import load_image
from vlforge.serve.metrics import ServeMetrics
from vlforge.serve.scheduler import Event, QueueFull, Scheduler, ShuttingDown
from vlforge.serve.service import ModelService
from vlforge.serve.threads import serial_cpu_ops


@dataclass
class ServerState:
    service: ModelService
    config: ServeConfig
    scheduler: Scheduler
    metrics: ServeMetrics
    api_keys: tuple[bytes, ...] = ()
    ready: bool = False
    replica: str | None = None  # the Ray Serve replica this app runs in, when it does
    started: int = field(default_factory=lambda: int(time.time()))


def server_of(request: Request) -> ServerState:
    return request.app.state.server


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.service.name:
        raise APIError(404, f"model '{model}' is not served here; this server serves '{state.service.name}'", "model")


def check_capability(state: ServerState, capability: str, endpoint: str) -> None:
    if capability not in state.service.capabilities:
        can = ", ".join(state.service.capabilities) or "nothing"
        raise APIError(400, f"{state.service.name} ({type(state.service.model).__name__}) cannot serve {endpoint}; "
                            f"it serves: {can}", None)


def _prepared_image(state: ServerState, url: str, param: str) -> torch.Tensor:
    serial_cpu_ops()  # the model's worker keeps the cores' CPU threads (vlforge.serve.threads)
    return load_image(url, param, state.config.limits, state.config.allow_remote_images, state.service.transform)


async def request_image(state: ServerState, url: str, param: str) -> torch.Tensor:
    """A request's image as the model takes it, decoded under the limits in a thread of the pool."""
    return await run_in_threadpool(_prepared_image, state, url, param)


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class EventChannel:
    """A sink the worker thread calls; events arrive, tagged with `index`, in an asyncio.Queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def sink(self, index: int):
        def put(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        return put


def overloaded(state: ServerState, err: Exception) -> APIError:
    if isinstance(err, QueueFull):
        return APIError(503, f"the server is busy: {err}; retry later", None,
                        {"Retry-After": str(state.config.batching.retry_after_s)})
    if isinstance(err, ShuttingDown):
        return APIError(503, str(err), None, {"Retry-After": str(state.config.batching.retry_after_s)})
    raise err


async def await_job(request: Request, state: ServerState, future: Any) -> Any:
    """A job's result; 504 past the request timeout, nothing wasted if the client left (the job is
    cancelled while it waits)."""
    wrapped = asyncio.wrap_future(future)
    timeout = state.config.batching.request_timeout_s
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(wrapped), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                future.cancel()
                raise APIError(499, "the client closed the request", None) from None
            if time.monotonic() > deadline:
                future.cancel()
                raise APIError(504, f"the request took longer than serve.batching.request_timeout_s={timeout:g}",
                               None) from None
        except ValueError as err:  # the model refused this input (e.g. a prompt past its length)
            raise APIError(400, str(err), None) from None
        except ShuttingDown as err:
            raise overloaded(state, err) from None
