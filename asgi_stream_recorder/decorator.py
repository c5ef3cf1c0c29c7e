"""``@recorded_stream``: an async generator function becomes an endpoint returning a recorded SSE response.

The wrapper is a plain coroutine function with the generator function's signature (so
FastAPI and Litestar still inject its parameters) and the response class as its return
annotation (so Litestar sends the result as an ASGI app). It deliberately sets no
``__wrapped__``: FastAPI unwraps endpoints to find async generator functions and would
then try to stream the wrapper's coroutine itself.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ParamSpec, TypedDict, overload

from starlette.types import Scope

from .recorders import Recorder
from .response import (
    Key,
    Metadata,
    OnDisconnect,
    RecordedStreamResponse,
    WireFormat,
    check_options,
    resolve_format,
    stream_options,
)

__all__ = ["Options", "build_response", "check_decorator_options", "recorded_stream"]

P = ParamSpec("P")


class Options(TypedDict, total=False):
    """The keyword options of :func:`recorded_stream`; the framework adapters take the same."""

    recorder: Recorder | None
    metadata: Metadata
    event: str | None
    on_disconnect: OnDisconnect
    ping: float | None
    headers: Mapping[str, str] | None
    format: str | WireFormat
    resume: bool
    key: Key
    done_event: bool
    timeout: float | None
    idle_timeout: float | None
    coalesce: float | None
    progress: float | None
    fallback: Callable[..., AsyncIterator[Any]] | None


def check_decorator_options(options: Options) -> Options:
    """Check a decorator's options where it is applied, not on the first request; returns them
    with the format resolved (a name becomes its :class:`WireFormat`)."""
    event, ping = options.get("event"), options.get("ping", 15.0)
    check_options(event, options.get("on_disconnect", "cancel"), ping)
    wire = resolve_format(options.get("format", "sse"), done_event=options.get("done_event", True))
    stream_options(wire, timeout=options.get("timeout"), idle_timeout=options.get("idle_timeout"),
                   coalesce=options.get("coalesce"), progress=options.get("progress"))
    fallback, key = options.get("fallback"), options.get("key")
    if fallback is not None and not inspect.isasyncgenfunction(fallback):
        raise TypeError(f"fallback must be an async generator function (async def with yield), not {fallback!r}")
    if key is not None and not isinstance(key, str) and not callable(key):
        raise TypeError(f"key must be a str or a callable of the request, not {type(key).__name__}")
    checked = options.copy()
    checked["format"] = wire
    return checked


def build_response(content: AsyncIterator[Any], options: Options, *,
                   fallback: Callable[[], AsyncIterator[Any]] | None = None,
                   request: Any = None) -> RecordedStreamResponse:
    """The response of one call of a decorated endpoint: ``content`` with checked ``options``
    (``fallback``: the option's generator function bound to this call's arguments)."""
    return RecordedStreamResponse(
        content, recorder=options.get("recorder"), metadata=options.get("metadata"), event=options.get("event"),
        on_disconnect=options.get("on_disconnect", "cancel"), ping=options.get("ping", 15.0),
        headers=options.get("headers"), format=options.get("format", "sse"), resume=options.get("resume", False),
        key=options.get("key"), done_event=options.get("done_event", True), request=request,
        timeout=options.get("timeout"), idle_timeout=options.get("idle_timeout"),
        coalesce=options.get("coalesce"), progress=options.get("progress"), fallback=fallback)


@overload
def recorded_stream(func: Callable[P, AsyncIterator[Any]], /) -> Callable[P, Any]: ...


@overload
def recorded_stream(
    func: None = None,
    /,
    *,
    recorder: Recorder | None = None,
    metadata: Mapping[str, Any] | Callable[[Scope], Mapping[str, Any]] | None = None,
    event: str | None = None,
    on_disconnect: OnDisconnect = "cancel",
    ping: float | None = 15.0,
    headers: Mapping[str, str] | None = None,
    format: str | WireFormat = "sse",
    resume: bool = False,
    key: Key = None,
    done_event: bool = True,
    timeout: float | None = None,
    idle_timeout: float | None = None,
    coalesce: float | None = None,
    progress: float | None = None,
    fallback: Callable[..., AsyncIterator[Any]] | None = None,
) -> Callable[[Callable[P, AsyncIterator[Any]]], Callable[P, Any]]: ...


def recorded_stream(
    func: Callable[P, AsyncIterator[Any]] | None = None,
    /,
    *,
    recorder: Recorder | None = None,
    metadata: Mapping[str, Any] | Callable[[Scope], Mapping[str, Any]] | None = None,
    event: str | None = None,
    on_disconnect: OnDisconnect = "cancel",
    ping: float | None = 15.0,
    headers: Mapping[str, str] | None = None,
    format: str | WireFormat = "sse",
    resume: bool = False,
    key: Key = None,
    done_event: bool = True,
    timeout: float | None = None,
    idle_timeout: float | None = None,
    coalesce: float | None = None,
    progress: float | None = None,
    fallback: Callable[..., AsyncIterator[Any]] | None = None,
) -> Any:
    """Stream what the decorated async generator yields as SSE, recording it as it goes.

    ``recorder``: where to record (default: the middleware's, else the process default
    SQLite file). ``metadata``: a dict, or a callable of the ASGI scope, stored with the
    stream. ``event``: the event name for plain items. ``on_disconnect``: ``"cancel"``
    stops the generator when the client leaves; ``"continue"`` lets it finish, recorded.
    ``ping``: seconds of silence before a keep-alive comment (None: never). ``headers``:
    extra response headers. ``format``: ``"sse"`` (plain text events), ``"openai"``
    (``chat.completion.chunk`` events and ``data: [DONE]``, for OpenAI clients), ``"ai-sdk"``
    (the Vercel AI SDK's UI message stream, for ``useChat``), or a ``WireFormat``.
    ``resume``: event ids carry the stream (``<stream_id>:<seq>``), the generation goes on
    when its client drops, and a request with such a ``Last-Event-ID`` joins the stream
    (replay, then live) instead of starting a new generation: a browser's ``EventSource``
    that loses its connection ends with the whole answer, exactly once.
    ``key``: stored with the stream to find it again (a conversation id): a string, or a
    function (sync or async) of the Starlette ``Request``.
    ``done_event``: end a completed stream with ``event: done`` (``{"stream_id", "status"}``).
    ``timeout``, ``idle_timeout``: seconds for the whole stream, and without an item (the
    first included); when one fires the generator is cancelled wherever it waits and closed,
    the client gets ``event: error`` and the record is ``failed`` with a ``TimeoutError``
    saying which. ``coalesce``: seconds; text items arriving within a window go out as one
    event (texts joined, its id the last seq in it; OpenAI: one chunk), at most one event per
    window; the record keeps every item. ``progress``: seconds between ``event: progress``
    events (``{"chunks", "chars", "elapsed_ms", "chars_per_s"}``; plain SSE only; never
    recorded or numbered). ``fallback``: an async generator function taking the endpoint's
    arguments, streamed instead when the generator fails before its first item (the
    first's error in ``metadata["fallback"]``); a failure after an item is a failure.
    """
    options = check_decorator_options(Options(
        recorder=recorder, metadata=metadata, event=event, on_disconnect=on_disconnect, ping=ping, headers=headers,
        format=format, resume=resume, key=key, done_event=done_event, timeout=timeout, idle_timeout=idle_timeout,
        coalesce=coalesce, progress=progress, fallback=fallback))

    def decorate(source: Callable[P, AsyncIterator[Any]]) -> Callable[P, Any]:
        if not callable(source):
            raise TypeError(f"@recorded_stream needs an async generator function, got {source!r}")

        async def endpoint(*args: P.args, **kwargs: P.kwargs) -> RecordedStreamResponse:
            request = await _read_request_bodies(args, kwargs.values())
            return build_response(source(*args, **kwargs), options,
                                  fallback=None if fallback is None else lambda: fallback(*args, **kwargs),
                                  request=request)

        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(endpoint, attr, getattr(source, attr, None))
        endpoint.__dict__.update(getattr(source, "__dict__", {}))
        endpoint.__dict__.pop("__wrapped__", None)
        endpoint.__signature__ = _signature(source)  # type: ignore[attr-defined]
        endpoint.__annotations__ = {
            **{n: p.annotation for n, p in endpoint.__signature__.parameters.items()  # type: ignore[attr-defined]
               if p.annotation is not inspect.Parameter.empty},
            "return": RecordedStreamResponse,
        }
        endpoint.__recorded_stream_source__ = source  # type: ignore[attr-defined]
        return endpoint

    return decorate if func is None else decorate(func)


async def _read_request_bodies(*groups: Any) -> Any:
    """Read and cache the body of any request object handed to the generator (Starlette's and
    Litestar's cache it), before the response's disconnect watch starts reading ``receive``:
    otherwise a generator awaiting ``request.json()`` races the watch for the body.
    Returns the first such request (a ``key`` function gets it), or None."""
    first = None
    for group in groups:
        for value in group:
            scope = getattr(value, "scope", None)
            body = getattr(value, "body", None)
            if isinstance(scope, dict) and scope.get("type") == "http" and inspect.iscoroutinefunction(body):
                await body()
                first = first or value
    return first


def _signature(source: Callable[..., Any]) -> inspect.Signature:
    """The source's signature with annotations evaluated where possible (our wrapper's
    globals are not the user's, so string annotations must be resolved here)."""
    try:
        sig = inspect.signature(source, eval_str=True)
    except Exception:  # a forward reference not yet defined: keep the strings
        sig = inspect.signature(source)
    return sig.replace(return_annotation=RecordedStreamResponse)
