"""Mutation testing for the core modules: ``python -m tools.mutate [MODULE ...]``.

A mutant is one small change to one source file, made with :mod:`ast`: a comparison
flipped (``<`` to ``<=``, ``==`` to ``!=``, ``is`` to ``is not``, ``in`` to ``not in``),
``and``/``or`` swapped, an ``if``/``while``/conditional-expression test negated, a constant
changed (``n`` to ``n+1`` and ``0``, ``True``/``False`` swapped, a non-empty string to
``""``), an arithmetic operator swapped (``+``/``-``, ``*``/``/``, ``//`` to ``*``) or a
statement inside a function removed (an expression statement, assignment, ``raise``,
``break``/``continue`` or bare ``return`` becomes ``pass``; ``return x`` becomes
``return None``). Docstrings, annotations, ``__all__``/``__slots__``, ``assert``, log
calls, ``if TYPE_CHECKING:`` blocks, ``sys.version_info``/``sys.platform`` tests, exception
messages, ``__repr__`` bodies and lines marked ``# pragma: no mutate`` are left alone.

Each module in ``tools/mutants.toml`` names its source file and the tests that matter for
it. The tool copies the repository to a temporary directory once per worker (never
writing to the real tree), checks that the tests pass there unmutated and import the
copy's package, then for each mutant rewrites the one file, runs the tests with ``-x``
and restores it. Failing tests (or a timeout) *catch* the mutant; passing tests let it
*survive*. Mutants listed as equivalent in ``mutants.toml`` (each with its reason) are not
run. Score = caught / (tried - equivalent).

Exit status: 0 (it measures, it does not gate), 1 when ``--min-score`` is given and a
module scores below it or ``--selftest`` fails, 2 on a usage or configuration error, 3
when a module's tests fail before any mutation.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's venv is 3.11; pytest depends on tomli below 3.11
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

REPO = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).resolve().with_name("mutants.toml")
BASELINE_TIMEOUT = 900.0  # seconds for the unmutated run: it only guards against a hang
PLUGIN = "_tools_mutate_plugin"  # a pytest plugin written into each copy (see _PLUGIN_SOURCE)

KINDS = ("cmp", "boolop", "negate", "num", "bool", "str", "arith", "stmt")

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
}
_ARITH_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
}
_LOGGERS = frozenset({"log", "logger", "logging", "_log", "_logger", "LOG", "LOGGER"})
_TYPING_CALLS = frozenset({"TypeVar", "NewType", "ParamSpec", "TypeVarTuple"})
_SKIPPED_NAMES = frozenset({"__all__", "__slots__"})
_PRAGMA = b"pragma: no mutate"
_ID = re.compile(r"^(?P<module>[A-Za-z0-9_.-]+):(?P<line>\d+):(?P<col>\d+):(?P<kind>[a-z]+):(?P<index>\d+)$")


class UsageError(Exception):
    """A bad command line or configuration: exit status 2."""


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    jobs: int = 2
    pytest_args: tuple[str, ...] = ("-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider")
    #: a mutant's tests time out after this many times the unmutated run, and never sooner than min_timeout
    timeout_factor: float = 5.0
    min_timeout: float = 30.0
    mutate_raise_messages: bool = False
    skip_functions: tuple[str, ...] = ("__repr__",)
    copy_ignore: tuple[str, ...] = (
        ".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
        "node_modules", "*.db", "*.db-wal", "*.db-shm", "dist", "build",
    )


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    source: str  # path relative to the repository root
    tests: tuple[str, ...]  # test files or node ids, relative to the root
    pytest_args: tuple[str, ...] = ()
    equivalent: dict[str, str] = field(default_factory=dict)  # mutant id -> why it cannot be caught
    changes: dict[str, str] = field(default_factory=dict)  # mutant id -> "original -> mutated", when given
    missing_optional: tuple[str, ...] = ()

    @property
    def dotted(self) -> str:
        return self.source.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


@dataclass(frozen=True)
class Config:
    settings: Settings
    modules: dict[str, ModuleSpec]


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where} must be a list of strings")
    return tuple(value)


def load_config(path: Path, root: Path) -> Config:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    raw_settings = data.get("settings", {})
    known = set(Settings.__dataclass_fields__)
    if unknown := set(raw_settings) - known:
        raise UsageError(f"{path}: unknown [settings] keys {sorted(unknown)} (known: {sorted(known)})")
    options: dict[str, Any] = {}
    for key, value in raw_settings.items():
        default = getattr(Settings, key)
        if isinstance(default, tuple):
            options[key] = _strings(value, f"settings.{key}")
        elif isinstance(default, bool) or not isinstance(value, (int, float)):
            if type(value) is not type(default):
                raise UsageError(f"settings.{key} must be {type(default).__name__}")
            options[key] = value
        else:
            options[key] = type(default)(value)
    settings = Settings(**options)
    if settings.jobs < 1:
        raise UsageError("settings.jobs must be at least 1")
    modules: dict[str, ModuleSpec] = {}
    for name, entry in data.get("modules", {}).items():
        modules[name] = _module_spec(name, entry, root, path)
    if not modules:
        raise UsageError(f"{path} lists no [modules.NAME] entries")
    return Config(settings, modules)


def _module_spec(name: str, entry: dict[str, Any], root: Path, path: Path) -> ModuleSpec:
    where = f"{path}: [modules.{name}]"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UsageError(f"{where}: a module name may hold letters, digits, '_', '.' and '-' only")
    if unknown := set(entry) - {"source", "tests", "optional_tests", "pytest_args", "equivalent"}:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
    source = entry.get("source")
    if not isinstance(source, str):
        raise UsageError(f"{where}: 'source' (a .py path relative to the repository) is required")
    if not (root / source).is_file():
        raise UsageError(f"{where}: source {source} does not exist under {root}")
    tests = list(_strings(entry.get("tests", []), f"{where} tests"))
    for test in tests:
        if not (root / test.split("::")[0]).exists():
            raise UsageError(f"{where}: test {test} does not exist under {root}")
    missing: list[str] = []
    for test in _strings(entry.get("optional_tests", []), f"{where} optional_tests"):
        (tests if (root / test.split("::")[0]).exists() else missing).append(test)
    if not tests:
        raise UsageError(f"{where}: no tests")
    table = entry.get("equivalent", {})
    if not isinstance(table, dict):
        raise UsageError(f"{where}: 'equivalent' must be a table of \"id\" = \"reason\"")
    equivalent: dict[str, str] = {}
    changes: dict[str, str] = {}
    for mutant_id, value in table.items():
        match = _ID.match(mutant_id)
        if match is None or match["module"] != name or match["kind"] not in KINDS:
            raise UsageError(f"{where}: equivalent id {mutant_id!r} is not {name}:LINE:COL:KIND:INDEX")
        reason, change = (value.get("reason"), value.get("change")) if isinstance(value, dict) else (value, None)
        if not isinstance(reason, str) or not reason.strip():
            raise UsageError(f"{where}: equivalent {mutant_id} needs a one-line reason")
        if isinstance(value, dict) and (set(value) - {"reason", "change"} or not isinstance(change, (str, type(None)))):
            raise UsageError(f"{where}: equivalent {mutant_id} takes {{ reason = \"...\", change = \"a -> b\" }}")
        equivalent[mutant_id] = reason
        if change is not None:
            changes[mutant_id] = change
    return ModuleSpec(
        name=name,
        source=source,
        tests=tuple(tests),
        pytest_args=_strings(entry.get("pytest_args", []), f"{where} pytest_args"),
        equivalent=equivalent,
        changes=changes,
        missing_optional=tuple(missing),
    )


# -- mutants -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    id: str
    module: str
    path: str
    line: int
    kind: str
    original: str  # for people: the changed code before ...
    mutated: str  # ... and after
    start: int  # byte span of the source that is replaced
    end: int
    replacement: bytes

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.replacement + source[self.end :]

    def describe(self) -> str:
        return f"{self.id}  {self.path}:{self.line}  {self.original} -> {self.mutated}"


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_string(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_log_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _name(node.func.value) in _LOGGERS


def _is_environment_check(test: ast.expr) -> bool:
    """``sys.version_info``/``sys.platform`` tests: flipping them only picks the other interpreter's code."""
    return any(isinstance(n, ast.Attribute) and n.attr in ("version_info", "platform") for n in ast.walk(test))


def _is_skipped_assignment(node: ast.stmt) -> bool:
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return any(isinstance(t, ast.Name) and t.id in _SKIPPED_NAMES for t in targets)


class _Finder:
    """Walks one module's tree and records every mutant, in source order."""

    def __init__(self, module: str, path: str, source: bytes, settings: Settings) -> None:
        self.module, self.path, self.source, self.settings = module, path, source, settings
        self.tree = ast.parse(source, filename=path)
        self.dump = ast.dump(self.tree)
        lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in lines:
            self.starts.append(self.starts[-1] + len(line))
        self.no_mutate = {number for number, line in enumerate(lines, 1) if _PRAGMA in line}
        self.counts: dict[tuple[int, int, str], int] = {}
        self.found: list[Mutant] = []
        self.invalid: list[str] = []

    def run(self) -> list[Mutant]:
        for statement in self.tree.body:
            self.visit(statement, in_function=False)
        return self.found

    # -- bookkeeping -----------------------------------------------------------------------
    def span(self, node: ast.expr | ast.stmt) -> tuple[int, int]:
        end_line = node.end_lineno if node.end_lineno is not None else node.lineno
        end_col = node.end_col_offset if node.end_col_offset is not None else node.col_offset
        return self.starts[node.lineno - 1] + node.col_offset, self.starts[end_line - 1] + end_col

    def text(self, node: ast.expr | ast.stmt) -> str:
        start, end = self.span(node)
        return self.source[start:end].decode("utf-8")

    def add(self, node: ast.expr | ast.stmt, kind: str, replacement: str, shown: str | None = None) -> None:
        """One mutant: ``node``'s source replaced by ``replacement`` (``shown`` is what people read)."""
        key = (node.lineno, node.col_offset, kind)
        index = self.counts.get(key, 0)
        self.counts[key] = index + 1  # counted before any check, so ids do not move when one is dropped
        if node.lineno in self.no_mutate:
            return
        mutant_id = f"{self.module}:{node.lineno}:{node.col_offset}:{kind}:{index}"
        start, end = self.span(node)
        mutant = Mutant(
            id=mutant_id, module=self.module, path=self.path, line=node.lineno, kind=kind,
            original=_short(self.text(node)), mutated=_short(shown if shown is not None else replacement),
            start=start, end=end, replacement=replacement.encode("utf-8"),
        )
        mutated = mutant.apply(self.source)
        try:
            same = ast.dump(ast.parse(mutated)) == self.dump
            compile(mutated, self.path, "exec", dont_inherit=True)
        except SyntaxError:
            self.invalid.append(mutant_id)
            return
        if not same:
            self.found.append(mutant)

    def expression(self, node: ast.expr, new: ast.expr, kind: str) -> None:
        text = ast.unparse(new)
        self.add(node, kind, f"({text})", text)

    # -- the walk --------------------------------------------------------------------------
    def visit(self, node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Assert, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.arg)):
            return
        if isinstance(node, ast.Expr) and (_is_string(node.value) or _is_log_call(node.value)):
            return  # docstrings, bare strings, log calls
        if isinstance(node, ast.stmt) and _is_skipped_assignment(node):
            return
        if isinstance(node, ast.Call) and (_is_log_call(node) or _name(node.func) in _TYPING_CALLS):
            return
        if isinstance(node, ast.Subscript) and _name(node.value) in ("Literal", "Annotated"):
            return  # a type, written as an expression (a type alias)
        if isinstance(node, ast.Call) and _name(node.func) == "cast":
            for arg in node.args[1:]:
                self.visit(arg, in_function)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in self.settings.skip_functions or any(_name(d) == "overload" for d in node.decorator_list):
                return
            for child in [*node.decorator_list, node.args]:
                self.visit(child, in_function)
            for statement in node.body:
                self.visit(statement, in_function=True)
            return
        if isinstance(node, ast.ClassDef):
            for child in [*node.decorator_list, *node.bases, *node.keywords]:
                self.visit(child, in_function)
            for statement in node.body:
                self.visit(statement, in_function=False)
            return
        if isinstance(node, ast.If) and _name(node.test) == "TYPE_CHECKING":
            for statement in node.orelse:
                self.visit(statement, in_function)
            return
        if isinstance(node, ast.If) and _is_environment_check(node.test):
            for statement in [*node.body, *node.orelse]:  # the code is mutated; which of it runs here is not
                self.visit(statement, in_function)
            return
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Raise):
            if in_function:
                self.add(node, "stmt", "pass")
            if self.settings.mutate_raise_messages:
                for child in ast.iter_child_nodes(node):
                    self.visit(child, in_function)
            return
        if isinstance(node, ast.JoinedStr):
            self.joined_str(node)
            return
        if in_function and isinstance(node, ast.stmt):
            self.statement(node)
        self.mutations(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.AnnAssign) and child is not node.value:
                continue  # the target and its annotation
            self.visit(child, in_function)

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.Break, ast.Continue)) or (
            isinstance(node, ast.AnnAssign) and node.value is not None
        ):
            self.add(node, "stmt", "pass")
        elif isinstance(node, ast.Return):
            if node.value is None:
                self.add(node, "stmt", "pass")
            elif not (isinstance(node.value, ast.Constant) and node.value.value is None):
                self.add(node, "stmt", "return None")

    def mutations(self, node: ast.AST) -> None:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                cmp = copy.copy(node)
                cmp.ops = [*node.ops[:i], _CMP_SWAP[type(op)](), *node.ops[i + 1 :]]
                self.expression(node, cmp, "cmp")
        elif isinstance(node, ast.BoolOp):
            boolop = copy.copy(node)
            boolop.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            self.expression(node, boolop, "boolop")
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH_SWAP:
            if not (isinstance(node.op, ast.Add) and (_is_string(node.left) or _is_string(node.right))):
                binop = copy.copy(node)
                binop.op = _ARITH_SWAP[type(node.op)]()
                self.expression(node, binop, "arith")
        elif isinstance(node, ast.AugAssign) and type(node.op) in _ARITH_SWAP:
            augassign = copy.copy(node)
            augassign.op = _ARITH_SWAP[type(node.op)]()
            self.add(node, "arith", ast.unparse(augassign))
        elif isinstance(node, ast.Constant):
            self.constant(node)
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            self.negate(node.test)
        elif isinstance(node, ast.comprehension):
            for condition in node.ifs:
                self.negate(condition)

    def negate(self, test: ast.expr) -> None:
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            inner = self.text(test.operand)
            self.add(test, "negate", f"({inner})", inner)
        else:
            text = self.text(test)
            simple = isinstance(test, (ast.Name, ast.Attribute, ast.Call, ast.Subscript, ast.Constant))
            self.add(test, "negate", f"(not ({text}))", f"not {text}" if simple else f"not ({text})")

    def constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self.add(node, "bool", repr(not value))
        elif isinstance(value, (int, float)):
            self.add(node, "num", repr(value + 1))
            if value != 0:
                self.add(node, "num", repr(type(value)(0)))
        elif isinstance(value, str) and value:
            self.add(node, "str", '""')
        elif isinstance(value, bytes) and value:
            self.add(node, "str", 'b""')

    def joined_str(self, node: ast.JoinedStr) -> None:
        """An f-string: each literal part emptied in turn (the expressions inside are left alone)."""
        for i, part in enumerate(node.values):
            if isinstance(part, ast.Constant) and isinstance(part.value, str) and part.value:
                fstring = copy.copy(node)
                fstring.values = [*node.values[:i], *node.values[i + 1 :]]
                self.expression(node, fstring, "str")


@dataclass(frozen=True)
class Mutants:
    spec: ModuleSpec
    source: bytes
    mutants: tuple[Mutant, ...]
    invalid: tuple[str, ...]

    @property
    def equivalent(self) -> dict[str, str]:
        """The listed equivalent mutants that are still there (same id and, if given, same change)."""
        stale = set(self.stale_equivalents())
        return {i: r for i, r in self.spec.equivalent.items() if i not in stale}

    def stale_equivalents(self) -> list[str]:
        found = {m.id: f"{m.original} -> {m.mutated}" for m in self.mutants}
        return sorted(
            i for i in self.spec.equivalent
            if i not in found or (i in self.spec.changes and self.spec.changes[i] != found[i])
        )


def find_mutants(spec: ModuleSpec, source: bytes, settings: Settings) -> Mutants:
    finder = _Finder(spec.name, spec.source, source, settings)
    found = finder.run()
    return Mutants(spec, source, tuple(found), tuple(finder.invalid))


# -- running -----------------------------------------------------------------------------------

_PLUGIN_SOURCE = '''\
"""Written by tools/mutate.py into its temporary copies of the repository, loaded with -p."""
import json
import os
import sys


def pytest_configure(config):
    # Hypothesis, when its plugin is on: the same examples every run, no shrinking (a failure is all a
    # mutant needs), no database carried from one mutant to the next, no deadline to trip under load.
    if config.pluginmanager.has_plugin("hypothesispytest"):
        from hypothesis import Phase, settings

        settings.register_profile(
            "tools-mutate", derandomize=True, database=None, deadline=None, print_blob=False,
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
        )
        settings.load_profile("tools-mutate")


def pytest_sessionfinish(session, exitstatus):
    # Where the target module was imported from: the copy, or the tool is measuring the wrong code.
    out = os.environ.get("TOOLS_MUTATE_PROBE_OUT")
    if out:
        names = os.environ["TOOLS_MUTATE_PROBE_MODULES"].split(",")
        found = {name: getattr(sys.modules.get(name), "__file__", None) for name in names}
        with open(out, "w", encoding="utf-8") as f:
            json.dump(found, f)
'''


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed", "failed" or "timeout"
    seconds: float
    output: str

    @property
    def killed_by(self) -> str | None:
        for line in self.output.splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                return line.split(" - ")[0]
        return None if self.status == "passed" else self.status


class Workspace:
    """A temporary copy of the repository that one worker mutates, one file at a time."""

    def __init__(self, directory: Path, python: str, settings: Settings, running: set[subprocess.Popen[bytes]],
                 lock: threading.Lock) -> None:
        self.dir, self.python, self.settings = directory, python, settings
        self.running, self.lock = running, lock
        (directory / f"{PLUGIN}.py").write_text(_PLUGIN_SOURCE, encoding="utf-8")

    def run(self, target: Mutants, mutant: Mutant | None, timeout: float | None, probe: bool = False) -> Outcome:
        path = self.dir / target.spec.source
        if mutant is not None:
            path.write_bytes(mutant.apply(target.source))
        _drop_bytecode(path)
        try:
            return self._pytest(target.spec, timeout, probe)
        finally:
            if mutant is not None:
                path.write_bytes(target.source)
            _drop_bytecode(path)  # the mutant's .pyc could pass for the original's (same size, same second)

    def _pytest(self, spec: ModuleSpec, timeout: float | None, probe: bool) -> Outcome:
        shutil.rmtree(self.dir / ".hypothesis", ignore_errors=True)  # no replayed examples from earlier mutants
        args = [self.python, "-m", "pytest", "-p", PLUGIN, *self.settings.pytest_args, *spec.pytest_args]
        env = {**os.environ, "PYTHONPATH": str(self.dir), "PYTHONHASHSEED": "0"}
        probe_out = self.dir.parent / f"{self.dir.name}.probe.json"
        if probe:
            env.update(TOOLS_MUTATE_PROBE_OUT=str(probe_out), TOOLS_MUTATE_PROBE_MODULES=spec.dotted)
            probe_out.unlink(missing_ok=True)
        args += spec.tests
        log_path = self.dir.parent / f"{self.dir.name}.log"
        started = time.monotonic()
        with log_path.open("w+b") as log:
            proc = subprocess.Popen(args, cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            with self.lock:
                self.running.add(proc)
            try:
                proc.wait(timeout=timeout)
                status = "passed" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill(proc)
                status = "timeout"
            finally:
                with self.lock:
                    self.running.discard(proc)
            _kill(proc)  # whatever the tests left running in the group
            log.seek(0)
            output = log.read().decode("utf-8", errors="replace")
        seconds = time.monotonic() - started
        if probe:
            output += "\n" + self._check_probe(spec, probe_out)
        return Outcome(status, seconds, output)

    def _check_probe(self, spec: ModuleSpec, probe_out: Path) -> str:
        try:
            found = json.loads(probe_out.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "PROBE ERROR: the plugin wrote nothing (did pytest start?)"
        where = found.get(spec.dotted)
        if where is None:
            return f"PROBE ERROR: the tests never imported {spec.dotted}: they cannot catch its mutants"
        if not Path(where).resolve().is_relative_to(self.dir.resolve()):
            return f"PROBE ERROR: {spec.dotted} was imported from {where}, not from the copy {self.dir}"
        return f"PROBE OK: {spec.dotted} imported from {where}"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group this tool started for one test run (pytest and anything it spawned)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _drop_bytecode(path: Path) -> None:
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


class Pool:
    """``jobs`` copies of the repository, each used by one worker thread at a time."""

    def __init__(self, root: Path, python: str, settings: Settings, jobs: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tools-mutate-"))
        self.running: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()
        self.free: queue.Queue[Workspace] = queue.Queue()
        self.workspaces: list[Workspace] = []
        ignore = shutil.ignore_patterns(*settings.copy_ignore)
        snapshot = self.base / "w0"
        shutil.copytree(root, snapshot, symlinks=True, ignore=ignore)  # the one read of the real tree
        for i in range(jobs):
            directory = self.base / f"w{i}"
            if i:
                shutil.copytree(snapshot, directory, symlinks=True)
            workspace = Workspace(directory, python, settings, self.running, self.lock)
            self.workspaces.append(workspace)
            self.free.put(workspace)
        self.executor = ThreadPoolExecutor(max_workers=jobs)
        self.snapshot = snapshot

    def read(self, spec: ModuleSpec) -> bytes:
        return (self.snapshot / spec.source).read_bytes()

    def submit(self, target: Mutants, mutant: Mutant, timeout: float) -> Future[Outcome]:
        def job() -> Outcome:
            workspace = self.free.get()
            try:
                return workspace.run(target, mutant, timeout)
            finally:
                self.free.put(workspace)

        return self.executor.submit(job)

    def baseline(self, target: Mutants) -> list[Outcome]:
        """The unmutated tests in every copy at once (which also warms each copy's bytecode)."""
        futures = [self.executor.submit(w.run, target, None, BASELINE_TIMEOUT, True) for w in self.workspaces]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            procs = list(self.running)
        for proc in procs:
            _kill(proc)
        self.executor.shutdown(wait=True)
        shutil.rmtree(self.base, ignore_errors=True)


# -- reporting ---------------------------------------------------------------------------------


@dataclass
class ModuleResult:
    target: Mutants
    baseline_seconds: float = 0.0
    baseline_output: str = ""
    timeout: float = 0.0
    seconds: float = 0.0
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    selected: tuple[Mutant, ...] = ()

    def status(self, mutant: Mutant) -> str:
        outcome = self.outcomes.get(mutant.id)
        if outcome is None:
            return "equivalent"
        if outcome.status == "passed":
            return "equivalent" if mutant.id in self.target.equivalent else "survived"
        return "timeout" if outcome.status == "timeout" else "caught"

    def summary(self) -> dict[str, Any]:
        spec = self.target.spec
        statuses = {m.id: self.status(m) for m in self.selected}
        counts = {s: list(statuses.values()).count(s) for s in ("caught", "timeout", "survived", "equivalent")}
        tried = len(self.selected)
        caught = counts["caught"] + counts["timeout"]
        scored = tried - counts["equivalent"]
        equivalent = self.target.equivalent
        wrongly = [m.id for m in self.selected if m.id in equivalent and statuses[m.id] in ("caught", "timeout")]
        return {
            "module": spec.name,
            "source": spec.source,
            "tests": list(spec.tests),
            "missing_optional_tests": list(spec.missing_optional),
            "tried": tried,
            "caught": caught,
            "timeouts": counts["timeout"],
            "survived": counts["survived"],
            "equivalent": counts["equivalent"],
            "score": round(100.0 * caught / scored, 1) if scored else None,
            "seconds": round(self.seconds, 1),
            "baseline_seconds": round(self.baseline_seconds, 1),
            "timeout": round(self.timeout, 1),
            "survivors": [_mutant_json(m) for m in self.selected if statuses[m.id] == "survived"],
            "equivalents": [
                {**_mutant_json(m), "reason": equivalent[m.id]}
                for m in self.selected if statuses[m.id] == "equivalent"
            ],
            "listed_equivalent_but_caught": wrongly,
            "stale_equivalents": self.target.stale_equivalents(),
            "invalid_mutants_skipped": len(self.target.invalid),
            "mutants": [
                {
                    "id": m.id,
                    "status": statuses[m.id],
                    "seconds": round(self.outcomes[m.id].seconds, 2) if m.id in self.outcomes else None,
                    "killed_by": self.outcomes[m.id].killed_by if statuses[m.id] in ("caught", "timeout") else None,
                }
                for m in self.selected
            ],
        }


def _mutant_json(m: Mutant) -> dict[str, Any]:
    return {"id": m.id, "file": m.path, "line": m.line, "kind": m.kind, "original": m.original, "mutated": m.mutated}


def print_summary(summary: dict[str, Any], verbose: bool, out: Callable[[str], None]) -> None:
    score = "n/a" if summary["score"] is None else f"{summary['score']:.1f}%"
    out(f"== {summary['module']}  {summary['source']}")
    out(f"   tests: {' '.join(summary['tests'])}")
    if summary["missing_optional_tests"]:
        out(f"   (optional tests not present: {' '.join(summary['missing_optional_tests'])})")
    out(f"   unmutated run {summary['baseline_seconds']} s; per-mutant timeout {summary['timeout']} s")
    out(
        f"   tried {summary['tried']}  caught {summary['caught']} ({summary['timeouts']} by timeout)"
        f"  survived {summary['survived']}  equivalent {summary['equivalent']}  score {score}"
        f"  [{summary['seconds']} s]"
    )
    if summary["survivors"]:
        out("   survivors:")
        for s in summary["survivors"]:
            out(f"     {s['id']}  {s['file']}:{s['line']}  {s['original']} -> {s['mutated']}")
    if verbose and summary["equivalents"]:
        out("   equivalent (from mutants.toml):")
        for s in summary["equivalents"]:
            out(f"     {s['id']}  {s['file']}:{s['line']}  {s['original']} -> {s['mutated']}  # {s['reason']}")
    if summary["listed_equivalent_but_caught"]:
        out(f"   WARNING: listed as equivalent but caught (remove from mutants.toml): "
            f"{' '.join(summary['listed_equivalent_but_caught'])}")
    if summary["stale_equivalents"]:
        out(f"   WARNING: equivalent ids in mutants.toml that match no mutant, or not its change (the code moved?): "
            f"{' '.join(summary['stale_equivalents'])}")


def print_table(summaries: Sequence[dict[str, Any]], out: Callable[[str], None]) -> None:
    out(f"{'module':<14}{'tried':>7}{'caught':>8}{'survived':>10}{'equiv':>7}{'score':>9}{'time':>9}")
    for s in summaries:
        score = "n/a" if s["score"] is None else f"{s['score']:.1f}%"
        out(f"{s['module']:<14}{s['tried']:>7}{s['caught']:>8}{s['survived']:>10}{s['equivalent']:>7}"
            f"{score:>9}{s['seconds']:>8.0f}s")


# -- the command -------------------------------------------------------------------------------


def _python(root: Path) -> str:
    for candidate in (root / ".venv" / "bin" / "python", REPO / ".venv" / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _select(config: Config, names: Sequence[str], only: Sequence[str]) -> list[ModuleSpec]:
    for mutant_id in only:
        match = _ID.match(mutant_id)
        if match is None:
            raise UsageError(f"--only {mutant_id!r}: not an id of the form MODULE:LINE:COL:KIND:INDEX")
        if match["module"] not in config.modules:
            raise UsageError(f"--only {mutant_id}: no module {match['module']!r} in mutants.toml")
    wanted = list(names) or [i.split(":")[0] for i in only] or list(config.modules)
    unknown = [n for n in wanted if n not in config.modules]
    if unknown:
        raise UsageError(f"unknown module(s) {', '.join(unknown)}; mutants.toml has: {', '.join(config.modules)}")
    return [config.modules[n] for n in dict.fromkeys(wanted)]


def _selected(target: Mutants, only: Sequence[str]) -> tuple[Mutant, ...]:
    if not only:
        return target.mutants
    ids = {m.id for m in target.mutants}
    mine = [i for i in only if i.split(":")[0] == target.spec.name]
    missing = [i for i in mine if i not in ids]
    if missing:
        raise UsageError(f"no such mutant(s): {' '.join(missing)} (see --list {target.spec.name})")
    return tuple(m for m in target.mutants if m.id in mine)


def run_module(pool: Pool, target: Mutants, selected: tuple[Mutant, ...], settings: Settings,
               timeout: float | None, verbose: bool, run_equivalent: bool = False) -> ModuleResult:
    """Score ``selected`` (equivalent ones are only run when ``run_equivalent``, e.g. for ``--only``)."""
    result = ModuleResult(target, selected=selected)
    spec = target.spec
    started = time.monotonic()
    baselines = pool.baseline(target)
    for outcome in baselines:
        if outcome.status != "passed" or "PROBE OK" not in outcome.output:
            tail = "\n".join(outcome.output.rstrip().splitlines()[-40:])
            raise BaselineError(
                f"{spec.name}: the tests do not pass on the unmutated code (or do not use the copy), so no mutant "
                f"can be scored.\n  command: pytest {' '.join([*settings.pytest_args, *spec.pytest_args, *spec.tests])}"
                f"\n  status: {outcome.status} after {outcome.seconds:.1f} s\n{tail}"
            )
    result.baseline_seconds = max(o.seconds for o in baselines)
    result.baseline_output = baselines[0].output
    result.timeout = timeout or max(settings.min_timeout, settings.timeout_factor * result.baseline_seconds)
    to_run = [m for m in selected if run_equivalent or m.id not in target.equivalent]
    futures = {pool.submit(target, m, result.timeout): m for m in to_run}
    for done, future in enumerate(as_completed(futures), 1):
        mutant = futures[future]
        outcome = future.result()
        result.outcomes[mutant.id] = outcome
        status = result.status(mutant)
        if verbose or status == "survived":
            _progress(f"[{spec.name} {done}/{len(to_run)}] {status:<8} {outcome.seconds:5.1f}s  {mutant.describe()}")
        elif done % 25 == 0:
            _progress(f"[{spec.name} {done}/{len(to_run)}]")
    result.seconds = time.monotonic() - started
    return result


class BaselineError(Exception):
    """The module's tests fail (or miss the copy) before any mutation: exit status 3."""


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.mutate",
        description="Mutation-test the modules listed in tools/mutants.toml: score = caught / (tried - equivalent).",
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help="module names from mutants.toml (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants (and which are equivalent), run nothing")
    parser.add_argument("--only", nargs="+", default=[], metavar="ID",
                        help="run only these mutant ids (equivalent ones too)")
    parser.add_argument("--jobs", type=int, metavar="N", help="parallel workers (default: settings.jobs, 2)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="seconds per mutant (default: from the unmutated run)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--min-score", type=float, metavar="PCT", help="exit 1 if a module scores below PCT")
    parser.add_argument("--config", type=Path, default=CONFIG, help="configuration (default: tools/mutants.toml)")
    parser.add_argument("--root", type=Path, default=REPO, help="repository to copy and test (default: this one)")
    parser.add_argument("--python", help="interpreter that runs pytest (default: ROOT/.venv/bin/python)")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per mutant; list equivalent mutants too")
    parser.add_argument("--selftest", action="store_true", help="check the tool itself on a built-in sample module")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.selftest:
        return selftest(args.python or _python(REPO))
    try:
        return _main(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaselineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # e.g. `--list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    config = load_config(args.config, root)
    specs = _select(config, args.modules, args.only)
    settings = config.settings
    if args.list:
        for spec in specs:
            target = find_mutants(spec, (root / spec.source).read_bytes(), settings)
            for m in _selected(target, args.only):
                reason = target.equivalent.get(m.id)
                print(m.describe() + (f"  [equivalent: {reason}]" if reason else ""))
            for stale in target.stale_equivalents():
                print(f"# WARNING: equivalent {stale} in mutants.toml matches no mutant (or not its change)",
                      file=sys.stderr)
        return 0
    jobs = args.jobs or settings.jobs
    summaries: list[dict[str, Any]] = []
    pool = Pool(root, args.python or _python(root), settings, jobs)
    try:
        targets = [find_mutants(spec, pool.read(spec), settings) for spec in specs]
        selections = [_selected(target, args.only) for target in targets]  # usage errors before any run
        for target, selected in zip(targets, selections, strict=True):
            result = run_module(pool, target, selected, settings, args.timeout, args.verbose, bool(args.only))
            summary = result.summary()
            summaries.append(summary)
            print_summary(summary, args.verbose, print)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        pool.close()
    if len(summaries) > 1:
        print()
        print_table(summaries, print)
    if args.json:
        args.json.write_text(json.dumps({"root": str(root), "modules": summaries}, indent=2) + "\n", encoding="utf-8")
    if args.min_score is not None:
        low = [s for s in summaries if s["score"] is not None and s["score"] < args.min_score]
        if low:
            names = ", ".join(f"{s['module']} ({s['score']:.1f}%)" for s in low)
            print(f"below --min-score {args.min_score:g}: {names}")
            return 1
    return 0


# -- self-test ---------------------------------------------------------------------------------

_SAMPLE = '''\
"""A sample module for the self-test (this docstring is never mutated)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    LIMIT = 10  # MARK type-checking

__all__ = ["clamp", "count_down", "label"]  # MARK all
log = logging.getLogger("sample")


def clamp(value: int, low: int = 0, high: int = 10) -> int:
    """Clamp a value into [low, high]."""
    assert low <= high  # MARK assert
    log.debug("clamping %s", value)  # MARK log
    if value < low:  # MARK equivalent
        return low  # MARK caught
    if value > high:
        return high
    return value


def count_down(n: int) -> int:
    steps = 0
    while n > 0:
        n -= 1  # MARK timeout
        steps += 1
    return steps


def label(n: int) -> str:
    if n == 0:
        raise ValueError("zero has no label")  # MARK raise
    return "many" if n > 1 else "one"  # MARK survivor
'''

_SAMPLE_TEST = '''\
import pytest

from sample import clamp, count_down, label


def test_clamp() -> None:
    assert clamp(5) == 5
    assert clamp(-1) == 0
    assert clamp(11) == 10


def test_count_down() -> None:
    assert count_down(3) == 3


def test_label() -> None:
    assert label(5) == "many"
    with pytest.raises(ValueError):
        label(0)
'''


def _line(mark: str) -> int:
    return next(i for i, text in enumerate(_SAMPLE.splitlines(), 1) if text.endswith(f"# MARK {mark}"))


def selftest(python: str) -> int:
    """Mutate the built-in sample with the real machinery and check the verdicts people rely on."""
    problems: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            problems.append(what)

    started = time.monotonic()
    plugins_off = ("-p", "no:asgi_stream_recorder", "-p", "no:faker", "-p", "no:hypothesispytest")  # start-up time
    settings = Settings(min_timeout=8.0, pytest_args=(*Settings.pytest_args, *plugins_off))
    spec = ModuleSpec("sample", "sample.py", ("test_sample.py",))
    target = find_mutants(spec, _SAMPLE.encode(), settings)

    def pick(mark: str, kind: str, original: str, mutated: str) -> str:
        ids = [m.id for m in target.mutants if (m.line, m.kind, m.original, m.mutated) == (_line(mark), kind, original,
                                                                                            mutated)]
        check(len(ids) == 1, f"one mutant {original} -> {mutated} on the line marked {mark}: {ids}")
        return ids[0] if ids else "-"

    lines = {m.line for m in target.mutants}
    print(f"selftest: {len(target.mutants)} mutants of a {len(_SAMPLE.splitlines())}-line sample")
    for mark in ("type-checking", "all", "assert", "log"):
        check(_line(mark) not in lines, f"nothing mutated on the {mark} line")
    docstrings = {i for i, text in enumerate(_SAMPLE.splitlines(), 1) if '"""' in text}
    check(not docstrings & lines, "docstrings are not mutated")
    check([m.kind for m in target.mutants if m.line == _line("raise")] == ["stmt"],
          "a raise is deleted, its message left alone")
    check(all(m.kind in KINDS for m in target.mutants), "every mutant has a known kind")
    check(len({m.id for m in target.mutants}) == len(target.mutants), "mutant ids are unique")
    again = find_mutants(spec, _SAMPLE.encode(), settings)
    check(again.mutants == target.mutants, "the same source gives the same mutants, ids and order")
    expected = {
        pick("caught", "stmt", "return low", "return None"): "caught",
        pick("timeout", "arith", "n -= 1", "n += 1"): "timeout",  # loops forever
        pick("survivor", "cmp", "n > 1", "n >= 1"): "survived",  # label(1) is never tested
        pick("equivalent", "cmp", "value < low", "value <= low"): "equivalent",
    }
    if problems:
        return 1
    equivalent_id = next(i for i, status in expected.items() if status == "equivalent")
    survivor_id = next(i for i, status in expected.items() if status == "survived")
    spec = replace(
        spec,
        equivalent={equivalent_id: "value == low gives low, which is value", survivor_id: "its code has changed"},
        changes={equivalent_id: "value < low -> value <= low", survivor_id: "n > 2 -> n >= 2"},
    )
    target = replace(target, spec=spec)
    with tempfile.TemporaryDirectory(prefix="tools-mutate-selftest-") as tmp:
        root = Path(tmp)
        (root / "sample.py").write_text(_SAMPLE, encoding="utf-8")
        (root / "test_sample.py").write_text(_SAMPLE_TEST, encoding="utf-8")
        pool = Pool(root, python, settings, 2)
        try:
            result = run_module(pool, target, target.mutants, settings, None, verbose=False)
        finally:
            pool.close()
        summary = result.summary()
        print_summary(summary, True, lambda line: print("  | " + line))
        check(f"PROBE OK: sample imported from {pool.base}" in result.baseline_output,
              "the tests imported the copy's module, not the original")
        for mutant_id, status in expected.items():
            check(result.status(next(m for m in target.mutants if m.id == mutant_id)) == status,
                  f"{mutant_id} is {status}")
        check(equivalent_id not in result.outcomes, "a mutant listed as equivalent is not run")
        check(summary["stale_equivalents"] == [survivor_id], "an equivalent entry whose change differs is not used")
        check(summary["tried"] == len(target.mutants), "tried counts every mutant")
        check(summary["caught"] + summary["survived"] + summary["equivalent"] == summary["tried"],
              "every mutant is counted once")
        check(summary["score"] == round(100.0 * summary["caught"] / (summary["tried"] - summary["equivalent"]), 1),
              "score = caught / (tried - equivalent)")
        check((root / "sample.py").read_text(encoding="utf-8") == _SAMPLE, "the original file is untouched")
        check(not pool.base.exists(), "the temporary copies are removed")
    print(f"selftest {'FAILED' if problems else 'passed'} in {time.monotonic() - started:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
