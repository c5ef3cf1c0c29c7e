"""Runnable chat examples: ``python -m examples.fastapi`` and ``python -m examples.litestar``."""
