"""``streams_app``: recorded streams over HTTP, to read, join live, and stop, behind a hook.

Mount it next to your endpoints (``app.mount("/streams", streams_app(recorder=..., authorize=...))``):

* ``GET /``: recent streams as JSON, newest first (``?status=&key=&limit=``);
* ``GET /{stream_id}``: one record as JSON (status, content so far, metadata, counts, times);
* ``GET /{stream_id}/events``: join it as SSE (see :mod:`~asgi_stream_recorder.join`);
* ``POST /{stream_id}/cancel``: stop its generation wherever it runs (``cancelled``,
  ``metadata["cancelled_by"] = "request"``).

Every request first goes through ``authorize(request, action, stream_id)`` (sync or async;
``action`` is ``"list"``, ``"read"``, ``"follow"`` or ``"cancel"``); a false answer is ``403``.
**Without a hook only loopback clients are let in**: records hold what your users asked and
were answered, so give it a real hook before exposing it.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .driver import SCOPE_KEY
from .join import join_response
from .recorders import Recorder, StreamRecord, StreamStatus, default_recorder

__all__ = ["Authorize", "loopback_only", "record_json", "streams_app"]

log = logging.getLogger("asgi_stream_recorder")

Authorize = Callable[[Request, str, "str | None"], "bool | Awaitable[bool]"]

_MAX_LIMIT = 1000


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

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            stream_id = request.path_params.get("stream_id")
            if not await allowed(request, self.action, stream_id):
                await PlainTextResponse("forbidden", 403)(scope, receive, send)
                return
            rec = recorder_for(request)
            await rec.ensure_open()
            response = await self.handler(request, rec)
            await response(scope, receive, send)

    async def list_streams(request: Request, rec: Recorder) -> Response:
        query = request.query_params
        try:
            status = StreamStatus(query["status"]) if query.get("status") else None
            limit = int(query.get("limit", "50"))
            if not 1 <= limit <= _MAX_LIMIT:
                raise ValueError(f"limit must be from 1 to {_MAX_LIMIT}")
        except ValueError as exc:
            return PlainTextResponse(str(exc), 400)
        key = query.get("key") or None
        if key is not None and (live := rec.live.by_key(key)) is not None:
            await rec.settle(live.stream_id)  # a stream of this process that just began: write its start first
        records = await rec.list_streams(status, limit, key=key)
        return JSONResponse([record_json(r, content=False) for r in records])

    async def read(request: Request, rec: Recorder) -> Response:
        record = await rec.get_soon(request.path_params["stream_id"])
        if record is None:
            return PlainTextResponse("no such stream", 404)
        return JSONResponse(record_json(record))

    async def follow(request: Request, rec: Recorder) -> Any:
        return join_response(rec, request.path_params["stream_id"])

    async def cancel(request: Request, rec: Recorder) -> Response:
        stream_id = request.path_params["stream_id"]
        if await rec.cancel(stream_id):
            return JSONResponse({"stream_id": stream_id, "cancelled": True}, 202)
        record = await rec.get(stream_id)
        if record is None:
            return PlainTextResponse("no such stream", 404)
        return JSONResponse({"stream_id": stream_id, "cancelled": False, "status": str(record.status)}, 409)

    return _NoTrailingSlash(Starlette(routes=[
        Route("/", guarded("list", list_streams), methods=["GET"]),
        Route("/{stream_id}", guarded("read", read), methods=["GET"]),
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
