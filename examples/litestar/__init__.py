"""The Litestar chat example (``python -m examples.litestar``)."""

from .app import create_app

__all__ = ["create_app"]
