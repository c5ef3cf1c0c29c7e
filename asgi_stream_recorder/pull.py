"""Pull mode: a recorded response whose body a framework iterates instead of an ASGI ``send``.

Django's ``StreamingHttpResponse`` and Quart's ``Response`` stream by iterating an async
iterator of bytes in the framework's own task, after the framework has sent the status and
headers itself. Our responses decide their status first (a resuming client's stream may be
unknown: ``404``; a server shutting down answers ``503``), then drive the stream. So a response
is split in two:

* :class:`Prepared`: the decided status and headers, and an ASGI app that sends exactly that
  start and then the body (``RecordedStreamResponse.prepare``, ``JoinResponse.prepare``);
* :func:`pull_body`: runs that app in a task of its own, the one :class:`StreamDriver` with its
  disconnect watch, keep-alive and timers unchanged, and yields the bytes it sends, one at a
  time (the driver waits for the framework to take each one: backpressure holds).

The framework's task owns that task for as long as it iterates. When the framework stops
iterating (its client left: Django 5 and Quart cancel the response, a failed send ends the
loop) the stream's disconnect watch hears ``http.disconnect``, and the stream ends as it does
under any ASGI server: ``cancelled`` by the client, the generator's ``finally`` run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope

__all__ = ["Prepared", "pull_body"]

log = logging.getLogger("asgi_stream_recorder")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A response whose status and headers are decided: ``app`` sends a start with exactly
    these, then the body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    app: ASGIApp

    @classmethod
    def of(cls, response: Response) -> Prepared:
        """A Starlette response (a refusal: 204, 400, 404, 503) as decided."""
        return cls(response.status_code, response.raw_headers, response)

    def header_items(self) -> list[tuple[str, str]]:
        """The headers as text, without the hop-by-hop ones a framework's server sets itself."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers if k.lower() != b"connection"]


async def pull_body(prepared: Prepared, scope: Scope, *, hangup: Receive | None = None) -> AsyncIterator[bytes]:
    """Run ``prepared.app`` for ``scope`` in a task of its own and yield the body it sends.

    Iterate it in one task, to its end or until that task stops it (``aclose``, or a
    cancellation): then the app hears ``http.disconnect`` and this waits for it to finish
    (its cleanup is bounded by the driver), so nothing outlives the iteration.
    ``hangup``: the request's own ``receive``, read for the client's leaving too; only for a
    framework that has read the whole request body before the view and reads no more.
    """
    sender, receiver = anyio.create_memory_object_stream[bytes](0)
    gone = anyio.Event()

    async def receive() -> Message:
        # The framework read the request body already; what is left to hear is the hang-up:
        # the framework stopping its iteration, or (given ``hangup``) the server saying so.
        if hangup is not None and not gone.is_set():
            async with anyio.create_task_group() as tg:

                async def on_gone() -> None:
                    await gone.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_gone)
                message = await hangup()
                tg.cancel_scope.cancel()
                if message["type"] == "http.disconnect":
                    return message
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] != "http.response.body":
            return  # the start: the framework sent it, from ``prepared``
        body = message.get("body", b"")
        if body:
            try:
                await sender.send(body)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise OSError("the client is gone") from None  # what a server's send raises
        if not message.get("more_body", False):
            sender.close()

    async def run() -> None:
        # Never raises: an error here would cancel the framework's own task mid-send.
        try:
            async with sender:
                await prepared.app(scope, receive, send)
        except Exception:
            log.exception("asgi_stream_recorder: a pulled response failed")

    stopped: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            async with receiver:
                async for body in receiver:
                    yield body
        except BaseException as exc:  # aclose() (GeneratorExit) or the framework's cancellation
            stopped = exc
        finally:
            gone.set()
    if stopped is not None:
        raise stopped
