"""What every provider adapter needs of a provider SDK's stream: closing it, and reading its events."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("asgi_stream_recorder")


async def close_stream(stream: Any, provider: str) -> None:
    """Close the provider's stream (and its HTTP response), also when our client left early."""
    close = getattr(stream, "aclose", None) or getattr(stream, "close", None)
    if close is None:
        return
    try:
        result = close()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # a failed close must not hide how the stream ended
        log.warning("closing the %s stream raised %r", provider, exc)


def event_dict(item: Any, adapter: str, provider: str) -> dict[str, Any]:
    """A stream event as a dict: a mapping as is, an SDK model through ``model_dump``."""
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    if dump is None:
        raise TypeError(f"{adapter}() expects {provider} stream events, got {type(item).__name__}")
    result: dict[str, Any] = dump(exclude_none=True, warnings=False)
    return result
