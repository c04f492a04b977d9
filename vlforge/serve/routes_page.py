"""`GET /`: a page to try the served model in a browser (plain HTML and JS in vlforge/serve/page/, no
build step). It needs no API key itself; the key the user types in is sent with its API calls."""
from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from vlforge.serve.errors import APIError

router = APIRouter(include_in_schema=False)

ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
# Only this server's own files and the API on it; images are data: URIs read in the browser.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                      "base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@cache
def _read(name: str) -> bytes:
    return files("vlforge.serve").joinpath("page", name).read_bytes()


@router.get("/")
async def page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/page/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"/page/{name}: no such file", "path")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
