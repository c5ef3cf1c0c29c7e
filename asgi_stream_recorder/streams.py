"""``streams_app``: recorded streams over HTTP, to read, join live, and stop, behind a hook.

Mount it next to your endpoints (``app.mount("/streams", streams_app(recorder=..., authorize=...))``):

* ``GET /``: recent streams as JSON, newest first (``?status=&key=&limit=``, and ``q=``: only
  those whose text, id, key, path or string metadata contain it, among the newest 1000);
* ``GET /{stream_id}``: one record as JSON (status, content so far, metadata, counts, times);
* ``GET /{stream_id}/chunks``: its chunks with their times as JSON (``?after=&limit=``);
* ``GET /{stream_id}/events``: join it as SSE (see :mod:`~asgi_stream_recorder.join`), in the
  format it was produced in or in the one ``?format=`` names;
* ``POST /{stream_id}/cancel``: stop its generation wherever it runs (``cancelled``,
  ``metadata["cancelled_by"] = "request"``).

A browser (``Accept: text/html``) gets pages at the same URLs: ``/`` lists the streams with
filters, refreshing itself while some are live; ``/{stream_id}`` shows one stream's text,
record and token timeline, growing while it streams. They are static files from
``asgi_stream_recorder/viewer/`` that read the JSON endpoints above; no CDN, no inline script
(a ``Content-Security-Policy`` of ``'self'``), data only ever shown as text.

Every request first goes through ``authorize(request, action, stream_id)`` (sync or async;
``action`` is ``"list"``, ``"read"``, ``"follow"`` or ``"cancel"``, and ``"asset"`` for the
pages' scripts, style sheet and icon, with no stream id); a false answer is ``403``. A page asks
what its JSON asks: ``"list"`` or ``"read"``. **Without a hook only loopback clients are let
in**: records hold what your users asked and were answered, so give it a real hook before
exposing it.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import inspect
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .driver import SCOPE_KEY
from .formats import FORMATS
from .join import join_response
from .recorders import Recorder, StreamRecord, StreamStatus, default_recorder

__all__ = ["Authorize", "loopback_only", "record_json", "streams_app"]

log = logging.getLogger("asgi_stream_recorder")

Authorize = Callable[[Request, str, "str | None"], "bool | Awaitable[bool]"]

_MAX_LIMIT = 1000
_SEARCH_WINDOW = 1000  # ``q=`` looks through this many of the newest streams
_MAX_QUERY = 200
_MAX_CHUNKS = 10_000  # per ``/chunks`` answer

#: What the pages may load and run: their own files, nothing inline, nothing from elsewhere.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "vary": "Accept",
}
_ASSETS = {
    "viewer.css": "text/css; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "list.js": "text/javascript; charset=utf-8",
    "stream.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def loopback_only(request: Request, action: str, stream_id: str | None) -> bool:
    """The default hook: only clients on this machine (127.0.0.0/8, ::1)."""
    host = request.client.host if request.client is not None else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def record_json(record: StreamRecord, *, content: bool = True) -> dict[str, Any]:
    """A record as JSON: what ``GET /{stream_id}`` answers (``content=False``: a list's rows)."""
    out: dict[str, Any] = {
        "id": record.id,
        "status": str(record.status),
        "created_at": record.created_at.isoformat(),
        "completed_at": None if record.completed_at is None else record.completed_at.isoformat(),
        "chunk_count": record.chunk_count,
        "error": record.error,
        "key": record.key,
        "format": record.format,
        "path": record.path,
        "method": record.method,
        "metadata": record.metadata,
    }
    if content:
        out["content"] = record.content
    else:
        out["preview"] = record.content[:200]
    return out


def _wants_html(request: Request) -> bool:
    """Whether the client asks for a page: its ``Accept`` names ``text/html`` (as browsers do) at
    a quality no lower than ``application/json``'s. ``*/*``, no header, or JSON first: JSON."""
    quality = {"text/html": 0.0, "application/json": 0.0}
    for part in request.headers.get("accept", "").split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if media not in quality:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media] = max(quality[media], q)
    return quality["text/html"] > 0 and quality["text/html"] >= quality["application/json"]


@functools.cache
def _viewer_file(name: str) -> bytes:
    """One of the viewer's files, shipped in the package (read once)."""
    return (importlib.resources.files("asgi_stream_recorder") / "viewer" / name).read_bytes()


def _page(request: Request, name: str, status: int = 200, stream_id: str = "") -> Response:
    """A viewer page, its mount path and stream id filled in (escaped: they become attribute
    values and text, never markup)."""
    root = quote(request.scope.get("root_path", "").rstrip("/"), safe="/")
    text = _viewer_file(name).decode()
    text = text.replace("{{root}}", html.escape(root)).replace("{{stream_id}}", html.escape(stream_id))
    return HTMLResponse(text, status, headers=_PAGE_HEADERS)


def _matches(record: StreamRecord, needle: str) -> bool:
    """``q=``: the text, id, key, path or a string metadata value contains it (any case)."""
    fields = [record.content, record.id, record.key or "", record.path or ""]
    fields += [v for v in record.metadata.values() if isinstance(v, str)]
    return any(needle in field.casefold() for field in fields)


def _number(value: str | None, default: int, low: int, high: int, name: str) -> int:
    """A whole-number query parameter from ``low`` to ``high`` (ValueError otherwise)."""
    number = int(value) if value else default
    if not low <= number <= high:
        raise ValueError(f"{name} must be from {low} to {high}")
    return number


def streams_app(*, recorder: Recorder | None = None, authorize: Authorize | None = None) -> ASGIApp:
    """A mountable ASGI app serving recorded streams; see the module docstring.

    ``recorder``: whose streams (default: the middleware's, else the process default).
    ``authorize``: the hook every request goes through (default: :func:`loopback_only`).
    """
    hook: Authorize = authorize if authorize is not None else loopback_only
    if authorize is None:
        log.warning("asgi_stream_recorder: streams_app has no authorize hook: only loopback clients may use it")

    def recorder_for(request: Request) -> Recorder:
        if recorder is not None:
            return recorder
        state = request.scope.get(SCOPE_KEY)
        return state.recorder if state is not None else default_recorder()

    async def allowed(request: Request, action: str, stream_id: str | None) -> bool:
        answer = hook(request, action, stream_id)
        if inspect.isawaitable(answer):
            answer = await answer
        return bool(answer)

    class guarded:
        def __init__(self, action: str, handler: Callable[[Request, Recorder], Awaitable[Any]]) -> None:
            self.action, self.handler = action, handler
            self.reads = action != "asset"  # (the pages' files need no open recorder)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            stream_id = request.path_params.get("stream_id")
            if not await allowed(request, self.action, stream_id):
                await PlainTextResponse("forbidden", 403)(scope, receive, send)
                return
            rec = recorder_for(request)
            if self.reads:
                await rec.ensure_open()
            response = await self.handler(request, rec)
            await response(scope, receive, send)

    async def list_streams(request: Request, rec: Recorder) -> Response:
        if _wants_html(request):
            return _page(request, "list.html")
        query = request.query_params
        try:
            status = StreamStatus(query["status"]) if query.get("status") else None
            limit = int(query.get("limit", "50"))
            if not 1 <= limit <= _MAX_LIMIT:
                raise ValueError(f"limit must be from 1 to {_MAX_LIMIT}")
            needle = query.get("q", "").strip().casefold()
            if len(needle) > _MAX_QUERY:
                raise ValueError(f"q must be at most {_MAX_QUERY} characters")
        except ValueError as exc:
            return PlainTextResponse(str(exc), 400)
        key = query.get("key") or None
        if key is not None and (live := rec.live.by_key(key)) is not None:
            await rec.settle(live.stream_id)  # a stream of this process that just began: write its start first
        records = await rec.list_streams(status, _SEARCH_WINDOW if needle else limit, key=key)
        if needle:
            records = [r for r in records if _matches(r, needle)][:limit]
        return JSONResponse([record_json(r, content=False) for r in records], headers={"vary": "Accept"})

    async def read(request: Request, rec: Recorder) -> Response:
        stream_id = request.path_params["stream_id"]
        record = await rec.get_soon(stream_id)
        if _wants_html(request):  # (its script reads the JSON, and says so when there is none)
            return _page(request, "stream.html", 200 if record is not None else 404, stream_id)
        if record is None:
            return PlainTextResponse("no such stream", 404)
        return JSONResponse(record_json(record), headers={"vary": "Accept"})

    async def chunks(request: Request, rec: Recorder) -> Response:
        """The chunks after ``?after=`` (at most ``?limit=``), with their times: for the timeline."""
        stream_id = request.path_params["stream_id"]
        try:
            after = _number(request.query_params.get("after"), 0, 0, 10**18, "after")
            limit = _number(request.query_params.get("limit"), _MAX_CHUNKS, 1, _MAX_CHUNKS, "limit")
        except ValueError as exc:
            return PlainTextResponse(str(exc), 400)
        record = await rec.get_soon(stream_id)  # (first writes what this process holds of it)
        if record is None:
            return PlainTextResponse("no such stream", 404)
        stored = await rec.chunks(stream_id, after)
        return JSONResponse({
            "stream_id": stream_id,
            "status": str(record.status),
            "text_event": record.text_event,
            # the stream's clock now (ms since it began): a live page times what it joins by it
            "elapsed_ms": round((time.time() - record.created_at.timestamp()) * 1000, 3),
            "chunks": [{"seq": c.seq, "data": c.data, "event": c.event, "at_ms": c.at_ms} for c in stored[:limit]],
            "more": len(stored) > limit,
        })

    async def follow(request: Request, rec: Recorder) -> Any:
        name = request.query_params.get("format") or None
        if name is not None and name not in FORMATS:
            return PlainTextResponse(f"format must be one of {', '.join(FORMATS)}", 400)
        return join_response(rec, request.path_params["stream_id"], format=name)

    def asset(name: str) -> Callable[[Request, Recorder], Awaitable[Response]]:
        async def serve_file(request: Request, rec: Recorder) -> Response:
            headers = {"x-content-type-options": "nosniff", "cache-control": "no-cache"}
            return Response(_viewer_file(name), media_type=_ASSETS[name], headers=headers)

        return serve_file

    async def cancel(request: Request, rec: Recorder) -> Response:
        stream_id = request.path_params["stream_id"]
        if await rec.cancel(stream_id):
            return JSONResponse({"stream_id": stream_id, "cancelled": True}, 202)
        record = await rec.get(stream_id)
        if record is None:
            return PlainTextResponse("no such stream", 404)
        return JSONResponse({"stream_id": stream_id, "cancelled": False, "status": str(record.status)}, 409)

    return _NoTrailingSlash(Starlette(routes=[
        *(Route(f"/_assets/{name}", guarded("asset", asset(name)), methods=["GET"]) for name in _ASSETS),
        Route("/", guarded("list", list_streams), methods=["GET"]),
        Route("/{stream_id}", guarded("read", read), methods=["GET"]),
        Route("/{stream_id}/chunks", guarded("read", chunks), methods=["GET"]),
        Route("/{stream_id}/events", guarded("follow", follow), methods=["GET"]),
        Route("/{stream_id}/cancel", guarded("cancel", cancel), methods=["POST"]),
    ], ))


class _NoTrailingSlash:
    """``/{id}/events/`` means ``/{id}/events``: some frameworks' mounts add the slash (Litestar's
    ``is_mount``), and a redirect would lose the mount's prefix."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if scope["type"] == "http" and len(path) > len(root) + 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/")}
            if "raw_path" in scope and scope["raw_path"] is not None:
                scope["raw_path"] = scope["raw_path"].rstrip(b"/")
        await self.app(scope, receive, send)
