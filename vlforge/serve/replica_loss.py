"""At Ray Serve's proxy: a request whose replica died under it answers 503 in OpenAI's error shape, with
Retry-After, instead of the proxy's bare 500 (or a connection closed mid-response); a stream cut off
mid-way ends with a 503 error event and `[DONE]`, as the app's own streams end on an error. The
proxy's own plain-text answers while no replica can take a request (a 404 before the application is
deployed or after it is deleted for a drain, a 503 when every replica's queue is full) become the
same JSON 503 with Retry-After.

Ray loads `proxy_middlewares` in every proxy through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which
`vlforge serve` sets before it starts a local Ray (on a cluster of your own, set it on `ray start`)."""
from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlforge.serve.errors import error_body

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "vlforge.serve.replica_loss.proxy_middlewares"
RETRY_AFTER_S = 1

log = logging.getLogger("vlforge.serve")

REPLICA_LOST = "the replica serving this request stopped before it answered; retry (Ray is replacing it)"
# The proxy's plain-text answers (the app's own are JSON, SSE or HTML) -> what the client is told.
PROXY_ANSWERS = {
    500: REPLICA_LOST,
    404: "no replica takes requests: the model is starting or draining; retry",
    503: "every replica is busy; retry later",
}


class ReplicaLossAs503:
    """Wraps Ray's proxy app. The app's own answers (JSON, SSE, HTML, its JSON 500s) pass untouched;
    what the proxy makes of a dead replica (no response, a plain-text 500) and its plain-text 404 / 503
    become a JSON 503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = event_stream = False
        replaced: str | None = None

        async def guarded(message: Message) -> None:
            nonlocal started, ended, event_stream, replaced
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] in PROXY_ANSWERS and not content_type.startswith(b"application/json"):
                    replaced = PROXY_ANSWERS[message["status"]]  # the proxy's own answer: ours below instead
                    return
                started, event_stream = True, content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                if replaced is not None:
                    return
                ended = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, guarded)
        except Exception:  # the proxy failed on this request: the client still gets an answer
            log.exception("vlforge serve: the proxy failed on %s", scope.get("path"))
        if not started:
            await _send_503(send, replaced or REPLICA_LOST)
        elif not ended:
            tail = b"" if not event_stream else (
                b"data: " + json.dumps(error_body(503, REPLICA_LOST)).encode() + b"\n\ndata: [DONE]\n\n")
            await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _send_503(send: Send, message: str) -> None:
    body = json.dumps(error_body(503, message)).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Middleware]:
    """What Ray's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) for its middlewares."""
    return [Middleware(ReplicaLossAs503)]
