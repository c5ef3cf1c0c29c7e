"""Redaction before storage: ``Recorder(redact=fn)`` runs ``fn`` over what a batch would store.

``fn`` takes a text and returns it redacted. It is applied by the writer, off the client's
path, to every chunk's data, to a stream's content and error, and to every string in its
metadata (keys are left as they are); the client still gets the original stream, and so do
followers in the same process (they are fed from memory, before storage). A redaction that
raises stores ``[redaction failed]`` in place of the text, never the text itself, and is
logged once per batch.

:func:`redact_secrets` is a ready-made ``fn`` for the usual leaks: API keys of the common
providers, bearer tokens and e-mail addresses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from .base import Batch, Segment, StreamEnd, StreamStart

__all__ = ["REDACTION_FAILED", "Redact", "redact_batch", "redact_secrets"]

log = logging.getLogger("asgi_stream_recorder")

Redact = Callable[[str], str]
REDACTION_FAILED = "[redaction failed]"

_SECRETS = re.compile(
    r"\b(?:sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}"  # OpenAI, Anthropic
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|gsk_[A-Za-z0-9]{20,})"  # Groq
)
_BEARER = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")


def redact_secrets(text: str) -> str:
    """``text`` with API keys, bearer/basic tokens and e-mail addresses replaced by
    ``[redacted]``, ``<scheme> [redacted]`` and ``[email]``."""
    if not text:
        return text
    text = _SECRETS.sub("[redacted]", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} [redacted]", text)
    return _EMAIL.sub("[email]", text)


def redact_batch(batch: Batch, redact: Redact) -> Batch:
    """A copy of ``batch`` with ``redact`` applied to what it stores (the queued one is not changed)."""
    failed = False

    def text(value: str) -> str:
        nonlocal failed
        try:
            result = redact(value)
            if not isinstance(result, str):
                raise TypeError(f"redact returned {type(result).__name__}, not str")
            return result
        except Exception as exc:
            if not failed:
                log.error("redaction failed (%r): storing %r in place of the text", exc, REDACTION_FAILED)
            failed = True
            return REDACTION_FAILED

    def meta(value: Any) -> Any:
        if isinstance(value, str):
            return text(value)
        if isinstance(value, dict):
            return {k: meta(v) for k, v in value.items()}
        if isinstance(value, list):
            return [meta(v) for v in value]
        return value

    starts = [StreamStart(s.id, s.created_at, s.path, s.method, meta(s.metadata), s.text_event, s.owner, s.key,
                          s.format) for s in batch.starts]
    segments = []
    for seg in batch.segments:
        copy = Segment(seg.stream_id)
        copy.seqs, copy.at_ms, copy.events = list(seg.seqs), list(seg.at_ms), seg.events and list(seg.events)
        copy.data = [text(d) for d in seg.data]
        segments.append(copy)
    ends = [StreamEnd(e.id, e.status, e.completed_at, None if e.error is None else text(e.error), meta(e.metadata),
                      None if e.content is None else text(e.content), e.chunk_count) for e in batch.ends]
    return Batch(starts, segments, ends)
