"""What the framework adapters (Django, Quart) share: the decorator's options worked out for
one request of a framework whose request object is not Starlette's."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.types import Message, Scope

from ..decorator import Options, build_response, check_decorator_options
from ..driver import SCOPE_KEY
from ..pull import Prepared
from ..recorders import Recorder

__all__ = ["adapter", "no_receive", "per_request", "prepare"]

Source = Callable[..., AsyncIterator[Any]]


def adapter(func: Source | None, options: Options, view: Callable[[Source, Options], Callable[..., Any]]) -> Any:
    """A framework's ``recorded_stream``: ``options`` checked where the decorator is applied,
    then ``view(source, options)`` made for each decorated generator function."""
    checked = check_decorator_options(options)

    def decorate(source: Source) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(source):
            raise TypeError(f"@recorded_stream needs an async generator function (async def with yield), "
                            f"got {source!r}")
        return functools.wraps(source)(view(source, checked))

    return decorate if func is None else decorate(func)


async def prepare(options: Options, source: Source, args: Sequence[Any], kwargs: dict[str, Any], *, request: Any,
                  scope: Scope, recorder: Callable[[], Recorder]) -> Prepared:
    """One call of a decorated view: the generator (and the fallback) called with the view's
    arguments, the options worked out for ``request``, the answer decided (see :mod:`..pull`)."""
    resolved = await per_request(options, request, scope, recorder)
    fallback = options.get("fallback")
    response = build_response(source(*args, **kwargs), resolved,
                              fallback=None if fallback is None else lambda: fallback(*args, **kwargs))
    return await response.prepare(scope, no_receive)


async def per_request(options: Options, request: Any, scope: Scope, recorder: Callable[[], Recorder]) -> Options:
    """``options`` with the ``metadata`` and ``key`` callables called with the framework's
    ``request``, and the recorder chosen: the option's, else the middleware's (left to the
    response), else ``recorder()``."""
    resolved = options.copy()
    if resolved.get("recorder") is None and scope.get(SCOPE_KEY) is None:
        resolved["recorder"] = recorder()
    metadata = resolved.get("metadata")
    if callable(metadata):
        resolved["metadata"] = dict(metadata(request))
    key = resolved.get("key")
    if callable(key):
        value = key(request)
        if inspect.isawaitable(value):
            value = await value
        if value is not None and not isinstance(value, str):
            raise TypeError(f"a stream's key must be a str or None, not {type(value).__name__}")
        resolved["key"] = value
    return resolved


async def no_receive() -> Message:
    """The ``receive`` given to ``prepare()``: with the options worked out it reads nothing (the
    framework has the request)."""
    raise RuntimeError("the framework reads the request itself")
