"""11. CPU instructions per event, counted by callgrind (all threads: the SQLite writer's too).

``python -m bench.instructions [--only NAME ...] [--profile NAME] [--pyprofile NAME]``

Each contender runs in its own process (:mod:`bench.instructions_child`) under
``valgrind --tool=callgrind``, once with 2,000 events and once with 12,000; the cost of an
event is the difference of the two totals over 10,000, so start-up, imports and the
recorder's opening and closing cancel out. Instruction counts hardly depend on the machine's
load or clock, unlike timings: this is the figure to watch for regressions in the hot path.
Repeated runs give the same counts for the unrecorded contenders; the recorded ones move by a
few tenths of a percent (how the writer thread interleaves with the loop). Any edit to the code
run, even one off the hot path, can move a figure by up to ~0.6%: CPython's type attribute
cache is indexed by object addresses, so its collisions shift with the memory layout.

``--profile NAME`` keeps the callgrind file of NAME at 12,000 events and prints the top 30
functions by self and by inclusive cost (``callgrind_annotate``), then the top functions by
cost per event (the two runs' per-function counts subtracted) and the cost per event in each
thread (two more runs, with ``--separate-threads=yes``). Callgrind sees C functions
only (the interpreter, SQLite, libc); ``--pyprofile NAME`` runs the same child under
:mod:`cProfile` instead, for the Python functions and their call counts.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .instructions_child import NAMES

ROOT = Path(__file__).resolve().parent.parent
LOW, HIGH = 2_000, 12_000
REFERENCE = "starlette_fstring"
TARGET = 1.3  # ours (SQLite) per event <= 1.3x Starlette's StreamingResponse over f-strings
LABELS = {
    "bare": "bare ASGI send loop, pre-encoded bytes",
    "starlette_bytes": "Starlette StreamingResponse, pre-encoded bytes",
    "starlette_fstring": "Starlette StreamingResponse, f-string per event",
    "ours_sqlite": "@recorded_stream, recording to SQLite",
    "ours_memory": "@recorded_stream, recording to memory",
    "ours_middleware": "@recorded_stream under StreamRecorderMiddleware (SQLite)",
    "sse_starlette": "sse-starlette EventSourceResponse, dict events",
}
TIMEOUT = 300.0  # seconds for one run under callgrind
_TOTAL = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.M)
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for var in ("PYTHONMALLOC", "PYTHONDEVMODE", "PYTHONASYNCIODEBUG", "PYTHONTRACEMALLOC", "PYTHONPROFILEIMPORTTIME"):
        env.pop(var, None)  # each would change what is counted
    return env


def count(name: str, events: int, out_file: Path, options: tuple[str, ...] = ()) -> int:
    """Instructions executed by the child running ``name`` with ``events`` events, all threads."""
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *options,
           sys.executable, "-m", "bench.instructions_child", name, str(events)]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{name} at {events} events failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    found = _TOTAL.search(out_file.read_bytes()) if out_file.exists() and not options else None
    if found:
        return int(found.group(1))
    collected = _COLLECTED.search(done.stderr)
    if collected:
        return int(collected.group(1))
    raise RuntimeError(f"{name} at {events} events: no instruction total in {out_file} or valgrind's output")


def measure(names: list[str], workdir: Path, say: Any = None) -> dict[str, dict[str, int]]:
    """Both runs of every contender, side by side on every core (counts do not depend on timing)."""
    jobs = [(n, e) for n in names for e in (HIGH, LOW)]  # the long runs first: less idle at the end
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = {job: pool.submit(count, job[0], job[1], workdir / f"callgrind.{job[0]}.{job[1]}") for job in jobs}
        totals: dict[str, dict[str, int]] = {n: {} for n in names}
        for (name, events), future in futures.items():
            totals[name][str(events)] = future.result()
            if say is not None:
                say(f"    {name} at {events:,} events: {totals[name][str(events)]:,} instructions")
    return totals


def run(names: list[str], say: Any = None) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="asr-callgrind-") as tmp:
        totals = measure(names, Path(tmp), say)
    per_event = {n: (t[str(HIGH)] - t[str(LOW)]) / (HIGH - LOW) for n, t in totals.items()}
    ref = per_event.get(REFERENCE)
    result: dict[str, Any] = {
        "events": [LOW, HIGH], "labels": {n: LABELS[n] for n in names}, "totals": totals,
        "per_event": per_event, "reference": REFERENCE, "target_ratio": TARGET,
        "ratio_to_reference": {n: v / ref for n, v in per_event.items()} if ref else None,
    }
    return result


def print_table(res: dict[str, Any]) -> None:
    ratios = res.get("ratio_to_reference") or {}
    width = max(len(label) for label in res["labels"].values())
    print(f"\n{'contender':<{width}}  {'instructions/event':>18}  {'x ' + res['reference']:>20}")
    for name, label in res["labels"].items():
        ratio = f"{ratios[name]:.2f}x" if name in ratios else "n/a"
        print(f"{label:<{width}}  {res['per_event'][name]:>18,.0f}  {ratio:>20}")
    if "ours_sqlite" in ratios:
        verdict = "PASS" if ratios["ours_sqlite"] <= res["target_ratio"] else "MISS"
        print(f"\n{verdict}  ours (SQLite) <= {res['target_ratio']}x {res['reference']}: "
              f"measured {ratios['ours_sqlite']:.2f}x")


# -- profiles ----------------------------------------------------------------------------------
_FUNCTION_LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([\s\d.]+%\)\s+)?(.+?)\s*$")


def _short(where: str) -> str:
    """``/tmp/python-build.../Objects/dictobject.c:insertdict [lib...]`` -> ``Objects/dictobject.c:insertdict``."""
    where = re.sub(r"\s*\[[^\]]*\]$", "", where)
    return re.sub(r"^.*?/Python-[\d.]+/", "", where)


def _function(where: str) -> str:
    """``./Include/object.h:_PyEval_EvalFrameDefault'2`` -> ``_PyEval_EvalFrameDefault``: one row per function."""
    return re.sub(r"'\d+$", "", where.rsplit(":", 1)[-1])


def annotate(out_file: Path, inclusive: bool) -> list[tuple[int, str]]:
    """(instructions, function) from ``callgrind_annotate``, costliest first."""
    done = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", "--show-percs=no",
                           f"--inclusive={'yes' if inclusive else 'no'}", str(out_file)],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)
    rows: list[tuple[int, str]] = []
    listing = False
    for line in done.stdout.splitlines():
        if line.startswith("Ir") and "file:function" in line:
            listing = True
            continue
        if not listing or line.startswith("-"):
            continue
        found = _FUNCTION_LINE.match(line)
        if found:
            rows.append((int(found.group(1).replace(",", "")), _short(found.group(2))))
    return rows


def profile(name: str, top: int = 30) -> Path:
    """Count ``name`` at both sizes, keep the 12,000-event file, print where the instructions go."""
    keep = Path(tempfile.mkdtemp(prefix=f"asr-callgrind-{name}-"))
    high, low = keep / f"callgrind.{name}.{HIGH}", keep / f"callgrind.{name}.{LOW}"
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = [pool.submit(count, name, events, path) for events, path in ((HIGH, high), (LOW, low))]
        n_high, n_low = (f.result() for f in totals)
    print(f"{name}: {n_high:,} instructions at {HIGH:,} events, {n_low:,} at {LOW:,}: "
          f"{(n_high - n_low) / (HIGH - LOW):,.0f} per event\ncallgrind file kept: {high}")
    for inclusive in (False, True):
        print(f"\nTop {top} functions by {'inclusive' if inclusive else 'self'} cost, {HIGH:,} events "
              "(start-up included)")
        for ir, where in annotate(high, inclusive)[:top]:
            print(f"{ir:>15,}  {where}")
    per_fn: dict[str, int] = {}
    for sign, path in ((1, high), (-1, low)):
        for ir, where in annotate(path, inclusive=False):
            fn = _function(where)
            per_fn[fn] = per_fn.get(fn, 0) + sign * ir
    ranked = sorted(per_fn.items(), key=lambda kv: -kv[1])[:top]
    print(f"\nTop {top} functions by self cost per event (({HIGH:,} - {LOW:,} events) / {HIGH - LOW:,}; "
          "inlined parts and recursion levels merged)")
    for where, ir in ranked:
        print(f"{ir / (HIGH - LOW):>15,.1f}  {where}")
    print("\nPer event, by thread (thread 1 runs the event loop; the others are worker threads, "
          "such as the SQLite writer's)")
    for thread, cost in threads(name, keep).items():
        print(f"{cost:>15,.1f}  thread {thread}")
    return high


def threads(name: str, workdir: Path) -> dict[int, float]:
    """Instructions per event in each thread, from runs with ``--separate-threads=yes``."""
    files = {events: workdir / f"threads.{name}.{events}" for events in (HIGH, LOW)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(count, name, events, path, ("--separate-threads=yes",))
                       for events, path in files.items()]:
            future.result()
    per: dict[int, float] = {}
    for sign, events in ((1, HIGH), (-1, LOW)):
        for part in workdir.glob(f"{files[events].name}-*"):
            found = _TOTAL.search(part.read_bytes())
            if found:
                thread = int(part.name.rsplit("-", 1)[1])
                per[thread] = per.get(thread, 0.0) + sign * int(found.group(1)) / (HIGH - LOW)
    return dict(sorted(per.items()))


def pyprofile(name: str) -> None:
    """The child at 12,000 events under cProfile: the top 40 Python functions by own time."""
    subprocess.run([sys.executable, "-m", "bench.instructions_child", name, str(HIGH), "--cprofile"], cwd=ROOT,
                   env=child_env(), check=True, timeout=TIMEOUT)


# -- entry points --------------------------------------------------------------------------------
def main(quick: bool) -> dict[str, Any]:
    """For ``bench.run``: every contender (counts are exact enough that a quick run is the same run)."""
    from .common import say

    result = run(NAMES, say)
    result["ours_sqlite_ratio"] = result["ratio_to_reference"]["ours_sqlite"]
    return result


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=NAMES, help="count only this contender (repeatable)")
    parser.add_argument("--profile", choices=NAMES, help="callgrind_annotate's top functions for this contender")
    parser.add_argument("--pyprofile", choices=NAMES, help="cProfile's top Python functions for this contender")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.profile:
        profile(args.profile)
    if args.pyprofile:
        pyprofile(args.pyprofile)
    if not (args.profile or args.pyprofile) or args.only:
        names = [n for n in NAMES if n in args.only or n == REFERENCE] if args.only else NAMES  # ratios need it
        print_table(run(names))
    print(f"\n{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
