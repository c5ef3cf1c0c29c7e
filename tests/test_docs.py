"""The documentation's code is part of the contract: every Python block in ``docs/`` (and, through
``tests/test_readme.py``, in ``README.md``) runs, or is an excerpt of a file the suite runs; and
the configuration reference matches the code.

Conventions in the pages (the same in ``README.md``):

- a block right after ``<!-- setup -->`` runs before every other block of its page, each of which
  runs in a fresh namespace, in a temporary working directory, on asyncio (top-level ``await``
  allowed), offline (loopback only), within a time bound;
- a block right after ``<!-- excerpt: path/in/repo.py -->`` is not run: every line of it (but
  ``...``) must be a line of that file, which must exist and be run by the test suite (a page of
  ``docs/`` or ``README.md`` is: then the lines must come from its blocks that run);
- a block right after ``<!-- pytest -->`` is a complete test file: it is written to a temporary
  directory and run with pytest, and must pass.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import re
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

import asgi_stream_recorder as asr
from asgi_stream_recorder.recorders import _URL_OPTIONS
from asgi_stream_recorder.recorders.postgres import PostgresRecorder
from asgi_stream_recorder.recorders.redis import RedisRecorder
from asgi_stream_recorder.testing import SSEClient, sse_client

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```python\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- (setup|excerpt|pytest)(?:: (\S+))? -->")
#: seconds one block may take, setup included
BLOCK_TIMEOUT = 30
#: kinds of block the suite runs (the others are excerpts)
RUN_KINDS = ("run", "setup", "pytest")


@dataclass
class Block:
    page: str  # the page's path from the repository root: docs/testing.md, README.md
    line: int
    kind: str  # "run", "setup", "excerpt" or "pytest"
    source: str
    target: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_in(path: Path) -> list[Block]:
    """The Python blocks of one Markdown page, with their markers."""
    text = path.read_text(encoding="utf-8")
    found = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start(2))
        marker = MARKER.fullmatch(m.group(1)) if m.group(1) else None
        kind, target = (marker.group(1), marker.group(2) or "") if marker else ("run", "")
        found.append(Block(path.relative_to(ROOT).as_posix(), line, kind, m.group(2), target))
    return found


def check_markers(path: Path) -> None:
    """A marker must sit right before a python block, or it marks nothing."""
    text = path.read_text(encoding="utf-8")
    for m in re.finditer(r"<!-- (setup|excerpt|pytest)[^\n]*-->\n(?!```python\n)", text):
        pytest.fail(f"{path.relative_to(ROOT)}: {m.group(0).strip()} is not right before a python block")
    for m in re.finditer(r"<!-- (setup|excerpt|pytest)[^\n]*-->", text):
        assert MARKER.fullmatch(m.group(0)), f"{path.relative_to(ROOT)}: malformed marker {m.group(0)}"


BLOCKS = [block for path in sorted(DOCS.rglob("*.md")) for block in blocks_in(path)]


def test_the_docs_have_code_and_every_block_is_accounted_for() -> None:
    assert len([b for b in BLOCKS if b.kind == "run"]) >= 15
    for path in DOCS.rglob("*.md"):
        check_markers(path)


def _compile(block: Block) -> Any:
    name = block.where
    # the block's own text in tracebacks (line numbers count from the block's first line)
    linecache.cache[name] = (len(block.source), None, block.source.splitlines(True), name)
    return compile(block.source, name, "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


async def _run(code: Any, namespace: dict[str, Any]) -> None:
    result = eval(code, namespace)
    if inspect.isawaitable(result):  # the block awaits at top level
        await result


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks may use loopback (a served fake), never the network."""
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else ""
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"a docs block tried to reach {host}: blocks run offline")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def run_block(block: Block, page: list[Block], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one block of ``page`` (after the page's setup blocks), or, for ``pytest``, its test file."""
    if block.kind == "pytest":
        _run_test_file(block, tmp_path)
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ASGI_STREAM_RECORDER_URL", raising=False)
    monkeypatch.setenv("ASGI_STREAM_RECORDER_DB", str(tmp_path / "default.db"))
    _no_network(monkeypatch)
    setups = [b for b in page if b.kind == "setup" and b is not block]
    # a real module, for frameworks that resolve annotations through sys.modules (Litestar)
    module = types.ModuleType("docs_block")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__

    async def main() -> None:
        with anyio.fail_after(BLOCK_TIMEOUT):
            for setup in setups:
                await _run(_compile(setup), namespace)
            await _run(_compile(block), namespace)

    anyio.run(main, backend="asyncio")


def _run_test_file(block: Block, tmp_path: Path) -> None:
    """A complete test file, as a user would copy it: run with pytest in an empty directory."""
    (tmp_path / "test_example.py").write_text(block.source, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"{block.where}:\n{result.stdout}{result.stderr}"
    tests = len(re.findall(r"^(?:async )?def test_", block.source, re.M))
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None and int(passed.group(1)) >= tests, result.stdout
    assert "failed" not in result.stdout and "skipped" not in result.stdout, result.stdout


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind in ("run", "pytest")], ids=lambda b: b.where)
def test_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_block(block, [b for b in BLOCKS if b.page == block.page], tmp_path, monkeypatch)


def _run_by_suite(path: Path) -> bool:
    """A test file, a file a test file names (by path or by module), or a page whose blocks run."""
    rel = path.relative_to(ROOT)
    if path.suffix == ".md":
        return rel.parts[0] == "docs" or rel.as_posix() == "README.md"
    if rel.parts[0] == "tests" and path.name.startswith("test_"):
        return True
    module = ".".join(rel.with_suffix("").parts)
    names = {rel.as_posix(), module, module.removesuffix(".app"), module.removesuffix(".__init__")}
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    return any(name in tests for name in names)


def check_excerpt(block: Block) -> None:
    """Every line of the excerpt (but ``...``) is a line of its file, which the suite runs."""
    path = ROOT / block.target
    assert path.is_file(), f"{block.where}: {block.target} does not exist"
    assert _run_by_suite(path), f"{block.where}: no test runs {block.target}"
    if path.suffix == ".md":  # a page: only its blocks that run count
        text = "\n".join(b.source for b in blocks_in(path) if b.kind in RUN_KINDS)
    else:
        text = path.read_text(encoding="utf-8")
    lines = {line.strip() for line in text.splitlines()}
    missing = [line for line in block.source.splitlines() if line.strip() not in lines | {"", "..."}]
    assert not missing, f"{block.where}: not in {block.target}: {missing}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "excerpt"], ids=lambda b: b.where)
def test_excerpt_comes_from_a_file_the_suite_runs(block: Block) -> None:
    check_excerpt(block)


#: the configuration reference's sections, and the callables whose parameters each must list
REFERENCED: dict[str, Callable[..., Any]] = {
    "recorded_stream": asr.recorded_stream,
    "StreamRecorderMiddleware": asr.StreamRecorderMiddleware.__init__,
    "Recorder": asr.Recorder.__init__,
    "Recorder.stream": asr.Recorder.stream,
    "Recorder.follow": asr.Recorder.follow,
    "Recorder.purge": asr.Recorder.purge,
    "SQLiteRecorder": asr.SQLiteRecorder.__init__,
    "PostgresRecorder": PostgresRecorder.__init__,
    "RedisRecorder": RedisRecorder.__init__,
    "MemoryRecorder": asr.MemoryRecorder.__init__,
    "open_recorder": asr.open_recorder,
    "streams_app": asr.streams_app,
    "stream_app": asr.stream_app,
    "join_response": asr.join_response,
    "sse_client": sse_client,
    "SSEClient.stream": SSEClient.stream,
    "SSEClient.collect": SSEClient.collect,
}
ROW = re.compile(r"^\| `(\**\w+)` \| ([^|]*) \|", re.M)


def _section(text: str, title: str) -> str:
    """The ``## title`` section of the page (a callable's name is in backquotes)."""
    heading = title if title[0].isupper() and " " in title else f"`{title}`"
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.parametrize("title", list(REFERENCED))
def test_configuration_reference_lists_every_parameter_with_its_default(title: str) -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    rows = {name: default.strip() for name, default in ROW.findall(_section(text, title))}
    expected = {}
    for p in inspect.signature(REFERENCED[title]).parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_KEYWORD:
            expected[f"**{p.name}"] = "-"
        elif p.default is p.empty:
            expected[p.name] = "required"
        else:
            expected[p.name] = f"`{p.default!r}`"
    missing, extra = set(expected) - set(rows), set(rows) - set(expected)
    assert not missing and not extra, f"{title}: the page lacks {missing}, and lists {extra} the code does not take"
    for name, default in expected.items():
        said = rows[name]
        assert said == default or said.startswith(default + " "), f"{title}({name}=): page {said}, code {default}"


def test_configuration_reference_covers_every_recorder_url_option() -> None:
    """The query options ``open_recorder`` takes from a URL, with their types, are the page's."""
    section = _section((DOCS / "configuration.md").read_text(encoding="utf-8"), "Recorder URLs")
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", section, re.M))
    assert rows == {name: kind.__name__ for name, kind in _URL_OPTIONS.items()}


def test_configuration_reference_recorder_urls_open_what_they_say() -> None:
    section = _section((DOCS / "configuration.md").read_text(encoding="utf-8"), "Recorder URLs")
    rows = re.findall(r"^\| `(\w+://[^`]*)` \| `(\w+)`", section, re.M)
    assert {kind for _, kind in rows} == {"SQLiteRecorder", "PostgresRecorder", "RedisRecorder", "MemoryRecorder"}
    for url, kind in rows:
        recorder = asr.open_recorder(url)  # builds it; connects to nothing
        assert type(recorder).__name__ == kind, f"{url}: {recorder!r}"
        assert "secret" not in repr(recorder)
