"""Django: ``@recorded_stream`` for async views, answered with a ``StreamingHttpResponse``.

Django (4.2 and later, served over ASGI) streams a ``StreamingHttpResponse`` by iterating its
content in the request's task. The decorated view's response is the core one, run in pull mode
(:mod:`asgi_stream_recorder.pull`): the same stream driver, with its disconnect watch,
keep-alive comments, timeouts and record; Django sends what it yields, event by event.

* A client that leaves: Django 5 cancels the response; Django 4.2 stops listening once it has
  the request body, so there the middleware (``StreamRecorderMiddleware`` around the ASGI
  application) tells of it; without either the stream runs to its end. The stream stops
  ``cancelled`` (or goes on, with ``on_disconnect="continue"``) and the generator's
  ``finally`` runs.
* The recorder: the decorator's ``recorder=``, else the middleware's (when
  ``StreamRecorderMiddleware`` wraps the ASGI application), else :func:`recorder`: the
  ``ASGI_STREAM_RECORDER`` setting (a recorder URL or a :class:`Recorder`), else the process
  default.
* Never compressed: Django's ``GZipMiddleware`` would compress each event as a gzip stream of
  its own (clients read only the first), so the view hides the request's ``Accept-Encoding``.
* ``metadata`` and ``key`` callables get the Django ``HttpRequest``; ``fallback`` gets the
  view's arguments.

This needs ``django`` (the ``[django]`` extra) and an ASGI server: under WSGI there is no
event loop to stream from, and the view says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    from django.conf import settings
    from django.http import HttpRequest, StreamingHttpResponse
except ImportError as exc:  # pragma: no cover - tested in a fresh environment (test_packaging)
    raise ImportError("asgi_stream_recorder.integrations.django needs Django: "
                      "pip install 'asgi-stream-recorder[django]'") from exc

from ..decorator import Options
from ..driver import SCOPE_KEY
from ..pull import pull_body
from ..recorders import Recorder, default_recorder, open_recorder
from ._framework import Source, adapter, prepare

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["SETTING", "recorded_stream", "recorder"]

#: The Django setting naming the recorder: a URL (``"sqlite:///streams.db"``,
#: ``"postgresql://..."``, ``"redis://..."``) or a :class:`Recorder`.
SETTING = "ASGI_STREAM_RECORDER"

_from_settings: dict[str, Recorder] = {}


def recorder() -> Recorder:
    """The recorder Django's settings name (:data:`SETTING`), made once per process; without
    the setting, :func:`~asgi_stream_recorder.default_recorder`. Hand it to the middleware
    in ``asgi.py`` so both use one."""
    value = getattr(settings, SETTING, None)
    if value is None:
        return default_recorder()
    if isinstance(value, Recorder):
        return value
    if not isinstance(value, str):
        raise TypeError(f"settings.{SETTING} must be a recorder URL or a Recorder, not {type(value).__name__}")
    if value not in _from_settings:
        _from_settings[value] = open_recorder(value)
    return _from_settings[value]


def recorded_stream(func: Source | None = None, /, **options: Unpack[Options]) -> Any:
    """Make an async generator view ``async def chat(request, ...)`` stream what it yields as
    recorded SSE. Takes the options of :func:`asgi_stream_recorder.recorded_stream`."""
    return adapter(func, options, _view)


def _view(source: Source, options: Options) -> Callable[..., Any]:
    async def view(request: HttpRequest, *args: Any, **kwargs: Any) -> StreamingHttpResponse:
        scope = getattr(request, "scope", None)
        if not isinstance(scope, dict):
            raise RuntimeError("a recorded stream needs Django served over ASGI (an ASGI server such as "
                               "uvicorn, and get_asgi_application()), not WSGI")
        # Django's GZipMiddleware compresses each chunk of an async stream as a gzip stream of
        # its own, which clients (httpx, curl) stop reading after the first: an event stream
        # is never compressed (as the middleware does for every SSE request).
        request.META.pop("HTTP_ACCEPT_ENCODING", None)
        prepared = await prepare(options, source, (request, *args), kwargs, request=request, scope=scope,
                                 recorder=recorder)
        state = scope.get(SCOPE_KEY)
        # Django 4.2 reads nothing after the body: the middleware's receive tells of a hang-up
        hangup = state.receive if state is not None else None
        answer = StreamingHttpResponse(pull_body(prepared, scope, hangup=hangup), status=prepared.status)
        for name, value in prepared.header_items():
            answer[name] = value
        return answer

    return view
