"""Wire formats: how a stream's chunks, its end, an error and a shutdown look to the client.

The record is the same whatever the format; a format only changes the bytes sent.
:class:`WireFormat` is plain SSE (``id: <seq>``, the chunk's event name, its text as
``data``); ``format="openai"`` is :class:`~asgi_stream_recorder.integrations.openai.OpenAIFormat`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..recorders.base import Chunk
from ..sse import ServerSentEvent, encode, encode_data

if TYPE_CHECKING:
    from ..session import StreamSession

__all__ = ["SSE_HEADERS", "WireFormat", "going_away_event", "resolve_format"]

#: Headers every event stream needs so that proxies and browsers neither cache nor buffer it.
SSE_HEADERS = {
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
}


def going_away_event(stream_id: str, last_seq: int) -> bytes:
    """The last event of a stream ended by a shutdown; the client may reconnect with Last-Event-ID."""
    return encode(
        ServerSentEvent(
            {"message": "server shutting down", "stream_id": stream_id, "last_event_id": str(last_seq)},
            event="shutdown",
            retry=1000,
        )
    )


class WireFormat:
    """Plain SSE. Subclasses change the bytes the client sees, never what is recorded.

    ``done_event``: end a completed (or cancelled-on-request) stream with ``event: done``
    whose data is ``{"stream_id": ..., "status": ...}`` and no ``id`` (so ``Last-Event-ID``
    stays on the last chunk), telling a finished answer from a dropped connection.
    """

    #: the name the stream's record keeps, so a join speaks the same format
    name = "sse"

    def __init__(self, *, done_event: bool = True) -> None:
        self.done_event = done_event
        if not done_event:
            self.name = "sse-without-done"

    def chunk(self, session: StreamSession, chunk: Chunk, extra: ServerSentEvent | None) -> bytes:
        """Bytes for one data chunk; ``extra`` carries a yielded event's ``retry``/``comment``."""
        if extra is None:
            return encode_data(chunk.data, session.event_id(chunk.seq), chunk.event)
        return encode(ServerSentEvent(chunk.data, event=chunk.event, id=session.event_id(chunk.seq),
                                      retry=extra.retry, comment=extra.comment))

    def end(self, session: StreamSession) -> bytes:
        """Bytes after the last chunk of a stream that completed (or was cancelled on request)."""
        if not self.done_event:
            return b""
        return encode(ServerSentEvent({"stream_id": session.id, "status": str(session.status)}, event="done"))

    def error(self, session: StreamSession) -> bytes:
        """What the client is told when the stream fails: no error text (it may hold secrets)."""
        return encode(ServerSentEvent({"message": "stream failed", "stream_id": session.id}, event="error"))

    def shutdown(self, session: StreamSession) -> bytes:
        """The last event of a stream the server ended while shutting down."""
        return going_away_event(session.id, session.seq)


SSE = WireFormat()
_SSE_NO_DONE = WireFormat(done_event=False)


def resolve_format(format: str | WireFormat, *, done_event: bool = True) -> WireFormat:
    """A format given by name (``"sse"``, ``"openai"``) or as an object."""
    if isinstance(format, WireFormat):
        return format
    if format == "sse":
        return SSE if done_event else _SSE_NO_DONE
    if format == "sse-without-done":
        return _SSE_NO_DONE
    if format == "openai":
        from ..integrations.openai import OpenAIFormat

        return OpenAIFormat()
    raise ValueError(f"format must be 'sse', 'openai' or a WireFormat, not {format!r}")
