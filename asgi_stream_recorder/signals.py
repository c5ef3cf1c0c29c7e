"""Learning that the server is shutting down, the moment it starts to.

A server tells the app of its shutdown with the lifespan ``shutdown`` message, but only
after its open connections have finished or its graceful timeout has run out; an endless
event stream never finishes, so every shutdown would wait out that timeout and then cut the
streams mid-event. :func:`listen_for_shutdown` learns of the shutdown earlier, so the
middleware can end each stream with its ``shutdown`` event at once. It has two sources;
each is used where it exists.

**Signals, in the process that runs the app** (uvicorn, ``hypercorn --workers 0``, any
server running the app in its main thread). One process-wide handler for SIGTERM and SIGINT
is put in front of whatever handler is there (the server's): it tells every listener, on
the listener's own event loop (thread- and signal-safely), then hands the signal on: it
calls the previous handler, or for ``SIG_DFL`` restores and re-raises the signal, or for
``SIG_IGN`` does nothing more. The server's handler is put back when the last listener
leaves, unless someone has replaced ours in the meantime.

**The shutdown Event of a hypercorn worker.** The ``hypercorn`` CLI never runs the app in
the process that gets the signal (hypercorn 0.18, ``hypercorn/run.py``):

* unless ``--workers 0``, it spawns worker processes (``multiprocessing`` "spawn"
  context), one with the default ``--workers 1``, and the app runs only in them;
* the parent sets SIGINT to ``SIG_IGN`` before spawning (the workers inherit that) and only
  then installs its own SIGINT/SIGTERM handler, so a worker starts with SIGINT ignored and
  SIGTERM at ``SIG_DFL``; hypercorn installs no handler in a worker;
* on SIGTERM/SIGINT the parent's handler only sets a ``multiprocessing.Event`` shared with
  the workers and sends them nothing. Each worker's shutdown trigger
  (``hypercorn.utils.check_multiprocess_shutdown_event``) polls ``is_set()`` every 0.1 s;
  once it is set the worker stops accepting, waits up to ``--graceful-timeout`` for its
  connections, cancels them, and only then sends the lifespan ``shutdown``;
* the parent signals workers in one case only: as soon as the first worker has exited it
  ``terminate()`` s (SIGTERM, default action: death) every worker still running, even one
  in the middle of its graceful stop.

So a SIGTERM to the parent (``kill``, ``docker stop``, Kubernetes) reaches the app by no
signal and no hook, only through that Event. A ``multiprocessing`` Event offers no file
descriptor or callback to wait on, and a thread blocked in ``Event.wait()`` could not be
woken by the undo without setting the Event (which stops every worker) or poking its
private condition. So in a hypercorn worker we do what hypercorn itself does: check the
same Event every 0.1 s on the app's event loop (a re-armed ``call_later`` on asyncio, one
system task sleeping between checks on trio), and call the listener once it is set.
``is_set()`` is two uncontended semaphore operations; there is one check per listener, not
per stream, and the undo cancels it. The Event is found read-only: in a spawned child
``multiprocessing.current_process()`` is the ``Process`` object its parent started,
unpickled, so its ``_target`` is hypercorn's worker function (``asyncio_worker``,
``uvloop_worker`` or ``trio_worker``) and its ``_kwargs`` hold the ``shutdown_event``
(private attributes of ``multiprocessing.BaseProcess``, stable for a decade; nothing of
hypercorn's is imported, patched or called). Anywhere else nothing is polled.

The signal handler is installed in a hypercorn worker too, for the signals that do reach
one: SIGINT from a terminal's Ctrl+C (sent to the whole process group; the worker still
ignores it after telling the listeners) and SIGTERM. For SIGTERM at ``SIG_DFL`` in a worker,
death is deferred by one check (0.1 s): if by then the Event is set, hypercorn is already
stopping this worker gracefully, and the signal is the parent's ``terminate()`` above or a
SIGTERM sent to every process at once (systemd's default ``KillMode=control-group``); it is
dropped, and once the Event is set the worker ignores SIGTERM for the rest of its life (its
disposition becomes ``SIG_IGN``), so its graceful stop and the recorder's drain complete;
the parent waits for it (``multiprocessing`` joins children at exit) and hypercorn's own
time limits still bound it. Otherwise (someone stopped this worker alone) the default action
applies as before, 0.1 s later, after the listeners have ended their streams. The Event is
never read inside the signal handler: ``is_set()`` takes the Event's lock, which the
interrupted code may hold.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import sniffio

__all__ = ["listen_for_shutdown"]

log = logging.getLogger("asgi_stream_recorder")

_SIGTERM: int | None = getattr(signal, "SIGTERM", None)
_SIGNALS = tuple(s for s in (_SIGTERM, getattr(signal, "SIGINT", None)) if s is not None)
POLL_INTERVAL = 0.1  # seconds between two checks of a hypercorn worker's shutdown Event: hypercorn's own

# key -> how to tell that listener (on its own loop); signal number -> the handler ours is in front of
_listeners: dict[int, Callable[[], None]] = {}
_previous: dict[int, Any] = {}
# key -> how to stop that listener's watch of the hypercorn shutdown Event
_watches: dict[int, Callable[[], None]] = {}
# when a SIGTERM whose default action is deferred reached this hypercorn worker (see the module doc)
_sigterm_at: float | None = None


class _SharedEvent(Protocol):
    def is_set(self) -> bool: ...


def listen_for_shutdown(key: object, on_shutdown: Callable[[], None]) -> Callable[[], None] | None:
    """Call ``on_shutdown`` on the current event loop (asyncio or trio) as soon as the server
    begins to shut down: at SIGTERM/SIGINT, and in a hypercorn worker when its parent tells it
    to stop. Call from inside the running loop; ``on_shutdown`` may be called more than once.

    ``key`` identifies the listener: listening again with the same key replaces its earlier
    listening. Returns the undo, to call on the same loop (it stops the watch, and puts the
    server's signal handler back once nobody listens), or None where there is nothing to
    listen to (not the main thread, and not a hypercorn worker)."""
    stop_signals = None
    if threading.current_thread() is threading.main_thread():
        stop_signals = _listen_for_signals(key, _loop_notifier(on_shutdown))
    event = _hypercorn_shutdown_event()
    stop_watch = _watch_event(key, event, on_shutdown) if event is not None else None
    if stop_signals is None and stop_watch is None:
        return None

    def undo() -> None:
        if stop_watch is not None:  # first: it may change the handler the signals' undo puts back
            stop_watch()
        if stop_signals is not None:
            stop_signals()

    return undo


# -- signals --------------------------------------------------------------------------------
def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _sigterm_at
    for notify in list(_listeners.values()):
        notify()
    prior = _previous.get(signum)
    if callable(prior):
        prior(signum, frame)
    elif prior == signal.SIG_DFL:
        if signum == _SIGTERM and _watches:  # a hypercorn worker: its watch decides, see the module doc
            if _sigterm_at is None:
                _sigterm_at = time.monotonic()
        else:
            _default_action(signum)
    # SIG_IGN, or a handler not installed from Python (None): nothing more to do


def _default_action(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def _listen_for_signals(key: object, notify: Callable[[], None]) -> Callable[[], None]:
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not _on_signal:  # (re)install in front of whatever is there now
            _previous[sig] = signal.signal(sig, _on_signal)
    _listeners[id(key)] = notify

    def stop() -> None:
        if _listeners.get(id(key)) is notify:  # not if the key has listened again since
            del _listeners[id(key)]
        if not _listeners:
            for sig, prior in list(_previous.items()):
                if signal.getsignal(sig) is _on_signal:
                    signal.signal(sig, prior)
            _previous.clear()

    return stop


def _loop_notifier(fn: Callable[[], None]) -> Callable[[], None]:
    """A thread- and signal-safe way to run ``fn`` on the current event loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()

        def notify_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):  # a listener left behind by a finished run
                token.run_sync_soon(fn)

        return notify_trio
    import asyncio

    loop = asyncio.get_running_loop()

    def notify_asyncio() -> None:
        with contextlib.suppress(RuntimeError):  # a listener left behind by a closed loop
            loop.call_soon_threadsafe(fn)

    return notify_asyncio


# -- a hypercorn worker's shutdown Event ----------------------------------------------------
def _hypercorn_shutdown_event() -> _SharedEvent | None:
    """The Event hypercorn's parent sets to stop this worker process, or None if this is not one."""
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is None:  # a multiprocessing child has it imported before it runs anything
        return None
    process = multiprocessing.current_process()
    target = getattr(process, "_target", None)
    kwargs = getattr(process, "_kwargs", None)
    if not str(getattr(target, "__module__", "")).startswith("hypercorn.") or not isinstance(kwargs, dict):
        return None
    event = kwargs.get("shutdown_event")
    return event if callable(getattr(event, "is_set", None)) else None


def _watch_event(key: object, event: _SharedEvent, on_shutdown: Callable[[], None]) -> Callable[[], None]:
    """Check ``event`` now and every POLL_INTERVAL on this loop; once set, call ``on_shutdown``
    and stop. Returns the stop, which also settles a deferred SIGTERM if it was the last watch."""
    replaced = _watches.pop(id(key), None)
    if replaced is not None:
        replaced()
    if sniffio.current_async_library() == "trio":
        cancel = _watch_on_trio(event, on_shutdown)
    else:
        cancel = _watch_on_asyncio(event, on_shutdown)
    _watches[id(key)] = cancel

    def stop() -> None:
        cancel()
        if _watches.get(id(key)) is cancel:
            del _watches[id(key)]
        if event.is_set():
            _worker_stopping()
        elif not _watches:
            _settle_sigterm(overdue_only=False)

    return stop


def _check(event: _SharedEvent, on_shutdown: Callable[[], None]) -> bool:
    """One check, on the loop (never in a signal handler: ``is_set`` takes the Event's lock).
    True once the Event is set and ``on_shutdown`` was called."""
    if event.is_set():
        _worker_stopping()
        on_shutdown()
        return True
    _settle_sigterm(overdue_only=True)
    return False


def _worker_stopping() -> None:
    """Hypercorn is stopping this worker, gracefully and within its own time limits; its parent
    SIGTERMs the workers still running once the first has exited, which would cut their stop
    short. So from now on this worker ignores SIGTERM, if it had the default disposition."""
    global _sigterm_at
    _sigterm_at = None
    if _SIGTERM is None or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(_SIGTERM)
    if current is _on_signal:
        if _previous.get(_SIGTERM) == signal.SIG_DFL:
            _previous[_SIGTERM] = signal.SIG_IGN  # what our handler defers to, and the undo puts back
    elif current == signal.SIG_DFL:
        signal.signal(_SIGTERM, signal.SIG_IGN)


def _settle_sigterm(*, overdue_only: bool) -> None:
    """A deferred SIGTERM that did not turn out to be hypercorn's stop: its default action now."""
    global _sigterm_at
    if _sigterm_at is None or _SIGTERM is None:
        return
    if overdue_only and time.monotonic() - _sigterm_at < POLL_INTERVAL:
        return
    _sigterm_at = None
    _default_action(_SIGTERM)


def _watch_on_asyncio(event: _SharedEvent, on_shutdown: Callable[[], None]) -> Callable[[], None]:
    import asyncio

    loop = asyncio.get_running_loop()
    handle: asyncio.Handle | None = None

    def check() -> None:
        nonlocal handle
        handle = None
        if not _check(event, on_shutdown):
            handle = loop.call_later(POLL_INTERVAL, check)

    handle = loop.call_soon(check)

    def cancel() -> None:
        if handle is not None:
            handle.cancel()

    return cancel


def _watch_on_trio(event: _SharedEvent, on_shutdown: Callable[[], None]) -> Callable[[], None]:
    import trio

    scope = trio.CancelScope()

    async def watch() -> None:
        with scope:
            try:
                while not _check(event, on_shutdown):  # noqa: ASYNC110 - a multiprocessing Event can only be polled
                    await trio.sleep(POLL_INTERVAL)
            except Exception:  # a system task must not raise: it would crash the whole run
                log.exception("asgi_stream_recorder: shutdown listener failed")

    trio.lowlevel.spawn_system_task(watch, name="asgi_stream_recorder: hypercorn shutdown watch")
    return scope.cancel
