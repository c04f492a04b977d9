"""The FastAPI app: routes, the body-size guard, errors in OpenAI's shape, health, metrics, and a
lifespan that starts the scheduler, warms the model up (then /readyz answers 200) and, on shutdown,
lets in-flight requests finish."""
from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import vlforge
from vlforge.serve import routes_generate, routes_page, routes_tasks
from vlforge.serve.auth import check_api_key
from vlforge.serve.errors import error_response, install_error_handlers
from vlforge.serve.scheduler import Job
from vlforge.serve.schemas import ModelCard, ModelList
from vlforge.serve.service import warm_up
from vlforge.serve.state import ServerState, server_of

log = logging.getLogger("vlforge.serve")


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a body over `limit` bytes with 413, by its Content-Length or while it streams in, and a
    POST whose Content-Type is not JSON with 415, before any handler reads it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            await error_response(415, f"Content-Type must be application/json, got '{content_type or 'none'}'",
                                 "content-type")(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await error_response(413, f"the body is over serve.limits.max_body_bytes={self.limit}",
                                 "body")(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await error_response(413, f"the body is over serve.limits.max_body_bytes={self.limit}",
                                 "body")(scope, receive, send)


def create_app(state: ServerState, warm: bool = True) -> FastAPI:
    """The app serving `state`'s model; the scheduler starts (and the model warms up) with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        if warm:  # on the model's worker, as every forward (vlforge.serve.threads)
            warming = Job("warm-up", None, lambda payloads: [warm_up(state.service) for _ in payloads])
            await asyncio.wrap_future(state.scheduler.submit_job(warming))
        state.ready = True
        log.info("vlforge serve: %s ready (%s)", state.service.name, ", ".join(state.service.capabilities))
        try:
            yield
        finally:
            state.ready = False
            await run_in_threadpool(state.scheduler.shutdown, state.config.graceful_shutdown_s)

    app = FastAPI(title="vlforge", version=vlforge.__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions and vision-language task endpoints.")
    app.state.server = state
    install_error_handlers(app)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("vlforge serve: unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unknown")
        state.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        if state.replica is not None:
            response.headers["x-vlforge-replica"] = state.replica
        return response

    app.add_middleware(BodyLimit, limit=state.config.limits.max_body_bytes)
    app.include_router(routes_generate.router)
    app.include_router(routes_tasks.router)
    app.include_router(routes_page.router)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up (no API key needed)."""
        return {"status": "ok"}

    @app.get("/readyz", dependencies=[Depends(check_api_key)])
    async def readyz(request: Request) -> JSONResponse:
        """The model is loaded and warm, and its worker runs."""
        server = server_of(request)
        if server.ready and server.scheduler.alive:
            return JSONResponse({"status": "ready", "model": server.service.name, "replica": server.replica,
                                 "pid": os.getpid()})
        return error_response(503, "the model is not ready", None, {"Retry-After": "1"})

    @app.get("/metrics", dependencies=[Depends(check_api_key)])
    async def metrics(request: Request) -> Response:
        return Response(server_of(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(check_api_key)])
    async def models(request: Request) -> ModelList:
        server = server_of(request)
        return ModelList(data=[ModelCard(id=server.service.name, created=server.started,
                                         capabilities=server.service.capabilities)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(check_api_key)])
    async def model(model_id: str, request: Request) -> Any:
        server = server_of(request)
        if model_id != server.service.name:
            return error_response(404, f"model '{model_id}' is not served here", "model")
        return ModelCard(id=server.service.name, created=server.started, capabilities=server.service.capabilities)

    return app
