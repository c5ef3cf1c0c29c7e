"""Run an example app under uvicorn on 127.0.0.1 (port from ``PORT``, default 8000)."""

from __future__ import annotations

import os
from typing import Any


def run(app: Any, name: str) -> None:
    import uvicorn

    port = int(os.environ.get("PORT", "8000"))
    source = "OpenAI-compatible model" if os.environ.get("OPENAI_API_KEY") else "offline demo generator"
    db = os.environ.get("ASGI_STREAM_RECORDER_DB", "streams.db")
    print(f"{name} chat example: open http://127.0.0.1:{port}/  (tokens: {source}; recording into {db})")
    # A short graceful shutdown: Ctrl-C must not wait for open streams (they are recorded as interrupted).
    uvicorn.run(app, host="127.0.0.1", port=port, timeout_graceful_shutdown=2)
