"""``python -m asgi_stream_recorder``: the command line (see :mod:`asgi_stream_recorder.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
