"""Quart: ``@recorded_stream`` for routes, answered with a Quart ``Response``.

Quart streams a response by iterating its body in the request's task, after sending the status
and headers. The decorated route's response is the core one run in pull mode
(:mod:`asgi_stream_recorder.pull`): the same stream driver, disconnect watch, keep-alive,
timeouts and record. The generator runs with the request's context, so ``request`` (and
``await request.get_json()``) work inside it; the response has no ``RESPONSE_TIMEOUT``
(a stream ends when its generator does, or its own ``timeout=`` says).

* A client that leaves: Quart cancels the response; the stream stops ``cancelled`` (or goes on,
  with ``on_disconnect="continue"``) and the generator's ``finally`` runs.
* The recorder: the decorator's ``recorder=``, else the middleware's (``app.asgi_app =
  StreamRecorderMiddleware(app.asgi_app, ...)``: lifespan, graceful shutdown), else the one
  :func:`init_app` gave the app (opened in ``before_serving``, closed in ``after_serving``), else
  the process default.
* ``metadata`` and ``key`` callables get the Quart request; ``fallback`` gets the route's
  arguments.

This needs ``quart`` (the ``[quart]`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    from quart import Quart, Response, current_app, request, stream_with_context
except ImportError as exc:  # pragma: no cover - tested in a fresh environment (test_packaging)
    raise ImportError("asgi_stream_recorder.integrations.quart needs Quart: "
                      "pip install 'asgi-stream-recorder[quart]'") from exc
from starlette.types import Scope

from ..decorator import Options
from ..pull import pull_body
from ..recorders import Recorder, default_recorder
from ._framework import Source, adapter, prepare

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EXTENSION", "init_app", "recorded_stream"]

#: Where :func:`init_app` leaves the app's recorder: ``app.extensions[EXTENSION]``.
EXTENSION = "asgi_stream_recorder"


def init_app(app: Quart, recorder: Recorder | None = None) -> Recorder:
    """Give ``app`` a recorder (default: the process default) that opens before the app serves
    (marking streams a dead process left ``interrupted``) and is drained and closed after it
    stops. For an app the middleware does not wrap (the middleware does this itself)."""
    chosen = recorder if recorder is not None else default_recorder()
    app.extensions[EXTENSION] = chosen

    @app.before_serving
    async def open_recorder() -> None:
        await chosen.open()
        await chosen.recover()

    @app.after_serving
    async def close_recorder() -> None:
        await chosen.close()

    return chosen


def recorded_stream(func: Source | None = None, /, **options: Unpack[Options]) -> Any:
    """Make an async generator route stream what it yields as recorded SSE. Takes the options of
    :func:`asgi_stream_recorder.recorded_stream`."""
    return adapter(func, options, _view)


def _view(source: Source, options: Options) -> Callable[..., Any]:
    async def view(*args: Any, **kwargs: Any) -> Response:
        scope: Scope = dict(request.scope)  # (a typed dict in Quart; a copy, as any ASGI middleware makes)
        prepared = await prepare(options, source, args, kwargs, request=request, scope=scope, recorder=_app_recorder)
        # (the body runs with this request's context: the generator may use ``request``)
        body = stream_with_context(pull_body)(prepared, scope)
        answer = Response(body, status=prepared.status)
        for name, value in prepared.header_items():
            answer.headers[name] = value
        answer.timeout = None  # a stream lasts as long as its generator, not RESPONSE_TIMEOUT
        return answer

    return view


def _app_recorder() -> Recorder:
    recorder: Recorder | None = current_app.extensions.get(EXTENSION)
    return recorder if recorder is not None else default_recorder()
