"""The benchmarks' own parts still fit the library (they are not run by the test suite)."""

from __future__ import annotations

import importlib

import pytest

from asgi_stream_recorder import Recorder


def test_the_null_recorder_of_the_benchmarks_is_a_complete_backend() -> None:
    from bench.common import NullRecorder

    assert isinstance(NullRecorder(), Recorder)  # an abstract method left unimplemented would raise here


@pytest.mark.parametrize("family", ["common", "inprocess", "recorder", "scale", "coalesce", "instructions", "looplag"])
def test_each_benchmark_module_imports(family: str) -> None:
    importlib.import_module(f"bench.{family}")
