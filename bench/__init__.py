"""Benchmarks for asgi_stream_recorder: ``python -m bench.run [--quick] [--only NAME]``."""
