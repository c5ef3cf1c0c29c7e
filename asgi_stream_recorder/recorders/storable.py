"""What a record may hold, decided once on the event loop before anything is queued.

Every backend stores metadata as JSON and text as valid Unicode. Rather than let a
value a backend cannot take fail a whole batch (and, retried forever, every stream
behind it), values are made storable when a stream starts and when it ends:

========================================  =============================================
given                                      stored
========================================  =============================================
``str``                                    as is; lone surrogates become U+FFFD
``int``, ``bool``, ``None``                as is
``float``                                  as is; NaN and infinities become ``null``
``list``, ``tuple``                        a JSON array
``set``, ``frozenset``                     a JSON array, sorted when its items sort
``dict``                                   an object; ``str`` keys as is, ``int``/``float``/
                                           ``bool``/``None`` keys as JSON spells them,
                                           other keys: the entry is left out
``datetime``, ``date``, ``time``           ISO 8601 text (``isoformat()``)
``enum.Enum``                              its value (made storable in turn)
``UUID``, ``Decimal``, ``PurePath``        their text
anything else, a cycle, nesting > 64       left out
========================================  =============================================

Whatever was changed or left out is listed in ``metadata["unstorable"]`` (one line per
place, e.g. ``"$.when: set stored as a list"``) and logged once per stream: a record
never silently holds a ``str()`` repr.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import pathlib
import uuid
from typing import Any

__all__ = ["UNSTORABLE_KEY", "storable_metadata", "storable_text"]

UNSTORABLE_KEY = "unstorable"
_MAX_DEPTH = 64


def storable_text(text: str) -> tuple[str, bool]:
    """``text`` with lone surrogates replaced by U+FFFD, and whether anything changed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text), True
    return text, False


def storable_metadata(metadata: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A JSON-safe copy of ``metadata`` and the list of what had to change (empty if nothing)."""
    notes: list[str] = []
    result = _dict(metadata, "$", notes, set(), 0)
    return result, notes


def _key(key: Any) -> str | None:
    if isinstance(key, str):
        return key
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float):
        return repr(key) if math.isfinite(key) else None
    return None


def _dict(value: dict[Any, Any], path: str, notes: list[str], seen: set[int], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seen.add(id(value))
    for k, v in value.items():
        key = _key(k)
        if key is None:
            notes.append(f"{path}[{_show(k)}]: key of type {type(k).__name__} left out")
            continue
        fixed, changed = storable_text(key)
        if changed:
            notes.append(f"{path}[{_show(k)}]: key had lone surrogates, replaced by U+FFFD")
        ok, stored = _value(v, f"{path}.{fixed}", notes, seen, depth + 1)
        if ok:
            out[fixed] = stored
    seen.discard(id(value))
    return out


def _value(value: Any, path: str, notes: list[str], seen: set[int], depth: int) -> tuple[bool, Any]:
    """(keep it?, the storable value)."""
    if value is None or isinstance(value, bool):
        return True, value
    if isinstance(value, enum.Enum):
        return _value(value.value, path, notes, seen, depth)
    if isinstance(value, str):
        text, changed = storable_text(value)
        if changed:
            notes.append(f"{path}: lone surrogates replaced by U+FFFD")
        return True, text
    if isinstance(value, int):
        return True, int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return True, float(value)
        notes.append(f"{path}: {value!r} stored as null")
        return True, None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return True, value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal, pathlib.PurePath)):
        return True, str(value)
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in seen:
            notes.append(f"{path}: cycle left out")
            return False, None
        if depth >= _MAX_DEPTH:
            notes.append(f"{path}: nested deeper than {_MAX_DEPTH} levels, left out")
            return False, None
        if isinstance(value, dict):
            return True, _dict(value, path, notes, seen, depth)
        items: Any = value
        if isinstance(value, (set, frozenset)):
            try:
                items = sorted(value)
            except TypeError:
                items = list(value)
            notes.append(f"{path}: {type(value).__name__} stored as a list")
        seen.add(id(value))
        out = []
        for i, item in enumerate(items):
            ok, stored = _value(item, f"{path}[{i}]", notes, seen, depth + 1)
            if ok:
                out.append(stored)
        seen.discard(id(value))
        return True, out
    notes.append(f"{path}: value of type {type(value).__module__}.{type(value).__qualname__} left out")
    return False, None


def _show(key: Any) -> str:
    try:
        text = repr(key)
    except Exception:
        text = f"<{type(key).__name__}>"
    return storable_text(text[:40])[0]
