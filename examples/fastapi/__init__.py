"""The FastAPI chat example (``python -m examples.fastapi``)."""

from .app import create_app

__all__ = ["create_app"]
