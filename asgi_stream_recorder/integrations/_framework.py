"""What the framework adapters (Django, Quart) share: the decorator's options worked out for
one request of a framework whose request object is not Starlette's."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Scope

from ..decorator import Options
from ..driver import SCOPE_KEY
from ..recorders import Recorder

__all__ = ["no_receive", "per_request"]


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
