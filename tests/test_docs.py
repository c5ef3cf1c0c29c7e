"""The documentation site's code is part of the contract: every Python block in ``docs/`` runs
(or is an excerpt of a file the suite runs), and the configuration reference matches the code.

Conventions in the pages:

- a block right after ``<!-- setup -->`` runs before every other block of its page, each of which
  runs in a fresh namespace, in a temporary working directory, on asyncio (top-level ``await``
  allowed), within a time bound;
- a block right after ``<!-- excerpt: path/in/repo.py -->`` is not run: every line of it (but
  ``...``) must be a line of that file, which must exist and be run by the test suite.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import re
import socket
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

import asgi_stream_recorder as asr
from asgi_stream_recorder.recorders.postgres import PostgresRecorder
from asgi_stream_recorder.recorders.redis import RedisRecorder

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```python\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- (setup|excerpt)(?:: (\S+))? -->")
#: seconds one block may take, setup included
BLOCK_TIMEOUT = 30


@dataclass
class Block:
    page: str
    line: int
    kind: str  # "run", "setup" or "excerpt"
    source: str
    target: str = ""


def _blocks() -> list[Block]:
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start(2))
            marker = MARKER.fullmatch(m.group(1)) if m.group(1) else None
            kind, target = (marker.group(1), marker.group(2) or "") if marker else ("run", "")
            found.append(Block(str(path.relative_to(DOCS)), line, kind, m.group(2), target))
    return found


BLOCKS = _blocks()


def test_the_docs_have_code_and_every_block_is_accounted_for() -> None:
    assert len([b for b in BLOCKS if b.kind == "run"]) >= 15
    for path in DOCS.rglob("*.md"):
        text = path.read_text(encoding="utf-8")
        # a marker must sit right before a python block, or it marks nothing
        for m in re.finditer(r"<!-- (setup|excerpt)[^\n]*-->\n(?!```python\n)", text):
            pytest.fail(f"{path.name}: {m.group(0).strip()} is not right before a python block")


def _compile(block: Block) -> Any:
    name = f"docs/{block.page}:{block.line}"
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


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "run"], ids=lambda b: f"{b.page}:{b.line}")
def test_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ASGI_STREAM_RECORDER_URL", raising=False)
    monkeypatch.setenv("ASGI_STREAM_RECORDER_DB", str(tmp_path / "default.db"))
    _no_network(monkeypatch)
    setups = [b for b in BLOCKS if b.kind == "setup" and b.page == block.page]
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


def _run_by_suite(path: Path) -> bool:
    """A test file, or a file a test file names (by path or by module)."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "tests" and path.name.startswith("test_"):
        return True
    module = ".".join(rel.with_suffix("").parts)
    names = {rel.as_posix(), module, module.removesuffix(".app"), module.removesuffix(".__init__")}
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    return any(name in tests for name in names)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "excerpt"], ids=lambda b: f"{b.page}:{b.line}")
def test_excerpt_comes_from_a_file_the_suite_runs(block: Block) -> None:
    path = ROOT / block.target
    assert path.is_file(), f"docs/{block.page}:{block.line}: {block.target} does not exist"
    assert _run_by_suite(path), f"docs/{block.page}:{block.line}: no test runs {block.target}"
    lines = {line.strip() for line in path.read_text(encoding="utf-8").splitlines()}
    missing = [line for line in block.source.splitlines() if line.strip() not in lines | {"", "..."}]
    assert not missing, f"docs/{block.page}:{block.line}: not in {block.target}: {missing}"


#: the configuration reference's sections, and the callables whose parameters each must list
REFERENCED: dict[str, Callable[..., Any]] = {
    "recorded_stream": asr.recorded_stream,
    "StreamRecorderMiddleware": asr.StreamRecorderMiddleware.__init__,
    "Recorder": asr.Recorder.__init__,
    "SQLiteRecorder": asr.SQLiteRecorder.__init__,
    "PostgresRecorder": PostgresRecorder.__init__,
    "RedisRecorder": RedisRecorder.__init__,
    "open_recorder": asr.open_recorder,
    "streams_app": asr.streams_app,
    "stream_app": asr.stream_app,
    "join_response": asr.join_response,
}
ROW = re.compile(r"^\| `(\**\w+)` \| ([^|]*) \|", re.M)


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## `{title}`\n")
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
