"""The wire-format protocol, and plain SSE, which is its default.

A format decides the bytes a client sees, never what is recorded: the record is the same
whatever the format, so a stream produced in one format can be joined in another.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..recorders.base import Chunk
from ..sse import PING, ServerSentEvent, encode, encode_data

if TYPE_CHECKING:
    from ..session import StreamSession

__all__ = [
    "REFUSAL_EVENT",
    "SSE_HEADERS",
    "THINKING_EVENT",
    "TOOL_CALL_EVENT",
    "WireFormat",
    "going_away_event",
]

#: Headers every event stream needs so that proxies and browsers neither cache nor buffer it.
SSE_HEADERS = {
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
}

# The recorded events that formats other than plain SSE understand (the integrations make them).
#: a tool-call delta, as JSON in the OpenAI chat shape: ``{"index", "id"?, "type"?, "function":
#: {"name"?, "arguments"?}}`` (the first delta of an index names the call, later ones add arguments)
TOOL_CALL_EVENT = "tool_call"
#: refusal text (sent as answer text by the formats that have no refusal of their own)
REFUSAL_EVENT = "refusal"
#: the model's thinking (reasoning) text
THINKING_EVENT = "thinking"


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
    """A wire format; this base class is plain SSE. Subclasses change the bytes, never the record.

    The protocol (each a method or attribute a subclass may override):

    * ``name``: stored with the stream, so that a join speaks the same format;
    * ``headers``: response headers the format adds to :data:`SSE_HEADERS`;
    * ``begin(session)``: bytes right after the response's start, before the first chunk (also
      sent by a join that replays from the start);
    * ``chunk(session, chunk, extra)``: one recorded chunk (``b""`` sends nothing);
    * ``end(session)``: after the last chunk of a stream that completed or was cancelled on request;
    * ``error(session)``: the last bytes of a failed stream, never the error's text (it may hold secrets);
    * ``shutdown(session)``: the last bytes of a stream the server ended while shutting down;
    * ``ping``: the keep-alive sent while the stream is idle (a comment, which every client skips).

    Plain SSE: every chunk is ``id: <seq>`` (``<stream_id>:<seq>`` when resumable), its event
    name and its text as ``data``. With ``done_event`` (the default) a completed stream ends
    with ``event: done`` whose data is ``{"stream_id", "status"}`` and no ``id`` (so
    ``Last-Event-ID`` stays on the last chunk), telling a finished answer from a dropped
    connection; a failure ends with ``event: error``, a shutdown with ``event: shutdown``.
    """

    name = "sse"
    headers: Mapping[str, str] = MappingProxyType({})
    ping = PING

    def __init__(self, *, done_event: bool = True) -> None:
        self.done_event = done_event
        if not done_event:
            self.name = "sse-without-done"

    def begin(self, session: StreamSession) -> bytes:
        """Bytes before the first chunk: none in plain SSE."""
        return b""

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
