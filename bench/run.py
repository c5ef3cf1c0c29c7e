"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME ...]``.

Prints a table of medians, ratios and targets; writes ``bench/results/latest.json`` and
``bench/results/latest.png`` (the plot needs matplotlib: ``pip install -e '.[bench]'``).
A ``--quick`` run writes ``quick.json`` and ``quick.png`` instead: latest.json holds full runs only.
With ``--only``, the other families' results are kept from the previous file of the same kind.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

FAMILIES = ["inprocess", "server", "recorder", "memory", "disconnect", "looplag", "leaks", "outage", "scale",
            "coalesce", "instructions"]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ["asgi-stream-recorder", "starlette", "fastapi", "sse-starlette", "uvicorn", "uvloop", "httptools",
                "h11", "httpx", "anyio", "trio", "aiosqlite", "matplotlib"]:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    import sqlite3

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "sqlite": sqlite3.sqlite_version, "packages": versions,
        "git_commit": commit, "load_average_at_start": os.getloadavg(),
    }


# -- the table --------------------------------------------------------------------------------------
def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if unit == "/s":
        return f"{x / 1e6:.2f}M/s" if x >= 1e6 else f"{x / 1e3:.1f}k/s"
    if unit == "x":
        return f"{x:.2f}x"
    if unit == "ms":
        return f"{x:.2f} ms"
    if unit == "KiB":
        return f"{x:.1f} KiB"
    return f"{x:,.0f}"


def p50_p99_max(d: dict[str, Any]) -> str:
    return f"p50 {fmt(d['p50_ms'], 'ms')}, p99 {fmt(d['p99_ms'], 'ms')}, max {fmt(d['max_ms'], 'ms')}"


def rows(res: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """(table rows, target checks) from the results."""
    table: list[list[str]] = []
    targets: list[dict[str, Any]] = []

    def target(name: str, value: float | None, op: str, goal: float, unit: str) -> None:
        ok = value is not None and (value >= goal if op == ">=" else value < goal)
        targets.append({"target": f"{name} {op} {goal:g}{'' if unit == 'x' else ' ' + unit}", "measured": value,
                        "pass": ok, "unit": unit})

    ip = res.get("inprocess")
    if ip:
        for name, e in ip["events_per_s"].items():
            table.append(["1 in-process", ip["labels"][name], fmt(e["median"], "/s"),
                          f"{e['ratio_to_raw']:.3f} of raw, {e['ratio_to_sse_starlette']:.2f}x sse-starlette"])
        so = ip.get("stream_only_events_per_s")
        if so:
            table.append(["1 in-process", "client's view: stream until the response returned, no final flush",
                          f"off {fmt(so['ours_null'], '/s')}, SQLite {fmt(so['ours_sqlite'], '/s')}",
                          f"{so['ours_sqlite'] / so['ours_null']:.2f}x (information; the target counts the flush)"])
        target("in-process: recorded to SQLite / recording off", ip["recorded_vs_unrecorded"], ">=", 0.90, "x")
        target("in-process: ours (SQLite) / sse-starlette",
               ip["events_per_s"]["ours_sqlite"]["ratio_to_sse_starlette"], ">=", 3.0, "x")
    sv = res.get("server")
    if sv:
        for stack in ("uvicorn-httptools-uvloop", "uvicorn-h11-asyncio"):
            st = sv.get(stack)
            if not st:
                continue
            for conc in (1, 10, 100):
                s = st.get(f"streams_{conc}")
                if not s:
                    continue
                for name, e in s.items():
                    table.append([f"2 {stack}, {conc} stream(s)", sv["labels"][name],
                                  f"{fmt(e['median'], '/s')} total, {fmt(e['per_stream'], '/s')} per stream",
                                  f"{e['ratio_to_raw']:.3f} of raw, {e['ratio_to_sse_starlette']:.2f}x sse-starlette"])
                target(f"{stack}, {conc} stream(s): ours (SQLite) / sse-starlette",
                       s["ours_sqlite"]["ratio_to_sse_starlette"], ">=", 1.2, "x")
        cc = sv.get("client_check")
        if cc:
            table.append(["2 client check", "raw endpoint read by the raw socket reader",
                          fmt(cc["raw_reader"]["median"], "/s"), ""])
            table.append(["2 client check", "raw endpoint read by httpx", fmt(cc["httpx"]["median"], "/s"),
                          f"{cc['httpx']['median'] / cc['raw_reader']['median']:.2f} of the raw reader"])
        t = sv.get("ttfb")
        if t:
            for name in ("raw", "ours_null", "ours_sqlite"):
                table.append([f"4 TTFB ({t['stack']})", sv["labels"][name],
                              f"head {fmt(t[name]['head_ms_median'], 'ms')}, first event "
                              f"{fmt(t[name]['first_event_ms_median'], 'ms')} median",
                              f"first event p99 {fmt(t[name]['first_event_ms_p99'], 'ms')}"])
            table.append(["4 TTFB", "added by recording (SQLite - off), first event",
                          f"{t['added_by_recording_ms_median']:+.3f} ms median",
                          f"{t['added_by_recording_ms_p99']:+.3f} ms p99"])
            target("TTFB added by recording (median)", t["added_by_recording_ms_median"], "<", 1.0, "ms")
    rc = res.get("recorder")
    if rc:
        for streams in (1, 100):
            s = rc[f"streams_{streams}"]
            table.append([f"3 recorder, {streams} stream(s)", "buffered writer into SQLite",
                          fmt(s["buffered"]["median"], "/s"), f"{s['ratio_buffered_to_naive']:.1f}x naive"])
            table.append([f"3 recorder, {streams} stream(s)", "naive INSERT+COMMIT per chunk (aiosqlite)",
                          fmt(s["naive"]["median"], "/s"), ""])
            target(f"recorder, {streams} stream(s): chunks/s into SQLite", s["buffered"]["median"], ">=", 300_000,
                   "chunks/s")
            target(f"recorder, {streams} stream(s): buffered / naive", s["ratio_buffered_to_naive"], ">=", 40, "x")
        b = rc["batched_paths"]
        table.append(["design: batch path", "sqlite3 in an anyio worker thread (ours)", fmt(b["to_thread"]["median"],
                      "/s"), f"{b['ratio_to_thread_to_aiosqlite']:.2f}x aiosqlite"])
        table.append(["design: batch path", "aiosqlite on asyncio, same batches", fmt(b["aiosqlite"]["median"], "/s"),
                      ""])
        e = rc["event_loops"]
        table.append(["design: event loop", "buffered path on asyncio", fmt(e["asyncio"]["median"], "/s"), ""])
        table.append(["design: event loop", "buffered path on trio", fmt(e["trio"]["median"], "/s"),
                      f"{e['ratio_trio_to_asyncio']:.2f}x asyncio"])
        bl = rc.get("busy_loop_ms")
        if bl:
            for way, label in (("ours", "multi-row statements (ours)"), ("per_row", "one statement per row")):
                table.append(["design: 1,000 streams' batch", label,
                              f"{bl[way + '_idle']['median']:,.0f} ms idle",
                              f"{bl[way + '_busy']['median']:,.0f} ms beside a busy thread"])
    mm = res.get("memory")
    if mm:
        for name, e in mm["idle"].items():
            n = e["runs"][0]["streams"]
            table.append([f"5 memory, {n} idle streams", name, f"{fmt(e['rss_per_stream_kib'], 'KiB')} per stream",
                          f"peak RSS {e['peak_rss_kib'] / 1024:.0f} MiB"])
        above = mm.get("above_floor_kib")
        if above is None and "raw_asgi" in mm["idle"]:  # (results of an older run)
            floor = mm["idle"]["raw_asgi"]["rss_per_stream_kib"]
            above = {n: e["rss_per_stream_kib"] - floor for n, e in mm["idle"].items() if n != "raw_asgi"}
        if above:
            bare = "no middleware" if "raw_asgi_via_middleware" in mm["idle"] else "as served then"
            table.append(["5 memory", f"above the bare-ASGI floor (uvicorn + FastAPI route, {bare})",
                          f"ours {fmt(above.get('ours'), 'KiB')}",
                          f"sse-starlette {fmt(above.get('sse_starlette'), 'KiB')}"
                          + (f", a bare stream through our middleware {fmt(above['raw_asgi_via_middleware'], 'KiB')}"
                             if "raw_asgi_via_middleware" in above else "")])
            for name, e in mm["idle"].items():
                per = e["runs"][0].get("per_stream")
                if per:
                    table.append(["5 memory, per idle stream", name,
                                  f"{per['tasks']:.1f} tasks, {per['gc_objects']:.0f} gc objects",
                                  ", ".join(f"{k} {v:g}" for k, v in list(per["by_type"].items())[:6])])
            if "ours" in above:
                target("RSS per idle stream above the bare-ASGI floor (ours)", above["ours"], "<", 4, "KiB")
        target(f"RSS per idle open stream ({mm['idle']['ours']['runs'][0]['streams']} streams)",
               mm["idle"]["ours"]["rss_per_stream_kib"], "<", 20, "KiB")
        lo = mm["loss"]
        table.append([f"5 loss, {lo['streams']} x {lo['tokens_per_stream']}", "lost / duplicated / wrong streams",
                      f"{lo['lost']} / {lo['duplicated']} / {lo['streams_with_wrong_chunks']}",
                      f"wall {lo['wall_seconds']:.1f} s, {lo['chunks_in_db']:,} chunks in the database"
                      + (f", server logged {lo['server_log']['lines']} lines" if "server_log" in lo else "")])
        bad = (lo["lost"] + lo["duplicated"] + lo["streams_with_wrong_chunks"] + lo["streams_not_completed"]
               + lo["content_mismatch"] + lo["client_saw_wrong_events"])
        targets.append({"target": f"zero loss at {lo['streams']} x {lo['tokens_per_stream']}", "measured": bad,
                        "pass": bad == 0, "unit": "bad"})
    dc = res.get("disconnect")
    if dc:
        for stack, d in dc["stacks"].items():
            for name, e in d.items():
                table.append([f"6 disconnect ({stack})", name, f"{fmt(e['median_ms'], 'ms')} median",
                              f"p99 {fmt(e['p99_ms'], 'ms')}, {e['finally_never_ran']} never ran"])
            target(f"disconnect noticed, p99 ({stack})", d["ours"]["p99_ms"], "<", 50, "ms")
    ll = res.get("looplag")
    if ll:
        for load in ll["loads"]:
            s = ll.get(f"streams_{load}")
            if not s:
                continue
            for name in ("ours", "plain", "sse_starlette"):
                e = s[name]
                cpu = "n/a" if e["server_cpu"] is None else f"{e['server_cpu']:.0%}"
                if e.get("server_waited_for_cpu") is not None:
                    cpu += f", waited for a CPU {e['server_waited_for_cpu']:.0%}"
                table.append([f"7 loop lag, {load} streams", ll["labels"][name],
                              p50_p99_max(e),
                              f"worst max {fmt(e['max_ms_worst'], 'ms')}, gen-2 GCs {fmt(e['gen2_collections'])} "
                              f"(longest {fmt(e['gen2_pause_max_ms'], 'ms')}), server CPU {cpu}"])
            table.append([f"7 loop lag, {load} streams", "ours p99 / plain StreamingResponse p99",
                          fmt(s["ratio_p99_ours_to_plain"], "x"),
                          f"{fmt(s['ratio_p99_ours_to_sse_starlette'], 'x')} of sse-starlette's"])
            target(f"loop lag p99 at {load} streams: ours / plain StreamingResponse", s["ratio_p99_ours_to_plain"],
                   "<", 1.5, "x")
            target(f"loop lag max at {load} streams: ours (worst round)", s["ours"]["max_ms_worst"], "<", 20, "ms")
    lk = res.get("leaks")
    if lk:
        for name, c in lk["candidates"].items():
            steps = c["steps"]
            for st in steps[:2] + (steps[-2:] if len(steps) > 2 else []):
                d = st["delta"]
                table.append([f"8 leaks, {name}", f"cycle {st['cycle']}, after {st['after']}",
                              f"RSS {d['rss_kib']:+,} KiB, fds {d['fds']:+}",
                              f"tasks {d['tasks']:+}, live stream objects {sum(d['live'].values()):+}, "
                              f"gc objects {d['gc_objects']:+,}"])
            table.append([f"8 leaks, {name}", f"verdict after {c['streams_total']:,} streams",
                          "leak suspected" if c["leak_suspected"] else "no growth beyond tolerance",
                          "; ".join(c["flags"])])
        o = lk["candidates"]["ours"]
        target("leaks (ours): fd growth once all streams ended", o["fd_growth_worst"], "<", lk["fd_tolerance"] + 1,
               "fds")
        target("leaks (ours): RSS growth once all streams ended", o["rss_growth_kib"], "<", lk["rss_tolerance_kib"],
               "KiB")
        alive = o["final_delta"]["tasks"] + sum(o["final_delta"]["live"].values())
        targets.append({"target": "leaks (ours): tasks and stream objects left alive", "measured": alive,
                        "pass": alive <= 0, "unit": "objects"})
    og = res.get("outage")
    if og:
        opts = og.get("recorder") or {}
        table.append(["9 outage", "recorder options (defaults)", str(opts.get("policy") or
                                                                     opts.get("constructor_defaults")), ""])
        for scen, v in og["scenarios"].items():
            sm = v["summary"]
            where = (f"9 outage, {scen}" if scen == "alone" else f"9 outage, +{og['bulk_streams']} bulk streams")
            for phase in ("before", "during", "after"):
                p = sm[phase]
                table.append([where, f"client token gaps {phase} the {og['lock_s']:.0f} s lock",
                              p50_p99_max(p),
                              f"{fmt(p['over_100ms'])} gaps > 100 ms"])
            table.append([where, "record: chunk_count + dropped_chunks vs sent",
                          f"{fmt(sm['chunk_count'])} + {fmt(sm['dropped_chunks'])} vs {fmt(sm['sent'])}",
                          f"{sm['runs_not_accounted']} run(s) not adding up"])
        bad = sum(v["summary"]["runs_not_accounted"] + v["summary"]["runs_client_ids_wrong"]
                  for v in og["scenarios"].values())
        targets.append({"target": "outage: chunk_count + dropped_chunks == events sent, every run", "measured": bad,
                        "pass": bad == 0, "unit": "bad"})
        if "alone" in og["scenarios"]:
            target("outage, one stream: client's max token gap during the lock",
                   og["scenarios"]["alone"]["summary"]["during_max_ms_worst"], "<", 100, "ms")
        if "bulk" in og["scenarios"]:
            target("outage, queue full: client's max token gap during the lock",
                   og["scenarios"]["bulk"]["summary"]["during_max_ms_worst"], "<", 1000, "ms")
    sc = res.get("scale")
    if sc:
        pattern = {"sqlite": "INSERT + COMMIT (aiosqlite)", "postgres": "SELECT max, INSERT, UPDATE (asyncpg)",
                   "redis": "XADD + HSET (redis-py)"}
        for streams in (1, 100):
            s = sc[f"streams_{streams}"]
            for k in sc["backends"]:
                table.append([f"10 scale-out, {streams} stream(s)", f"{k}: library path, batched",
                              fmt(s[f"library_{k}"]["median"], "/s"),
                              f"{fmt(s['ratio_library_to_per_chunk'][k], 'x')} per-chunk"])
                table.append([f"10 scale-out, {streams} stream(s)", f"{k}: per chunk, {pattern[k]}",
                              fmt(s[f"per_chunk_{k}"]["median"], "/s"), ""])
        fo = sc["follow"]
        where = f"10 follow, {fo['tokens']} tokens x {fo['rounds']}"
        for k in sc["backends"]:
            b = fo[k]["follower_cross_process_b"]
            table.append([where, f"{k}: follower on process B", p50_p99_max(b),
                          f"flush_interval {fo['flush_interval_s'] * 1000:.0f} ms"])
        table.append([where, "follower in-process on A (floor, all backends)",
                      p50_p99_max(fo["follower_in_process_a_all"]), ""])
    ins = res.get("instructions")
    if ins:
        ratios = ins["ratio_to_reference"]
        for name, label in ins["labels"].items():
            table.append([f"11 instructions/event ({ins['events'][1]:,} - {ins['events'][0]:,} events)", label,
                          fmt(ins["per_event"][name]), f"{ratios[name]:.2f}x Starlette f-string"])
        ratio = ratios["ours_sqlite"]
        targets.append({"target": f"instructions/event: ours (SQLite) / Starlette f-string <= {ins['target_ratio']:g}x",
                        "measured": ratio, "pass": ratio <= ins["target_ratio"], "unit": "x"})
    co = res.get("coalesce")
    if co:
        for name in ("off", "10ms", "50ms"):
            c = co[name]
            table.append([f"12 coalesce, {co['tokens']} fast tokens", f"coalesce={name}",
                          f"{c['events']} events, {c['bytes']} bytes",
                          f"{co['cpu_us_per_token'][name]['median']:.1f} us CPU/token ({c['cpu_ratio_to_off']:.2f}x)"])
        for name, w in co.get("wire", {}).items():
            table.append(["12 coalesce over uvicorn, 10,000 fast tokens", f"coalesce={name}",
                          f"{w['events']} events, {w['bytes']} bytes",
                          f"server {w['server_cpu_us_per_token']:.1f} us CPU/token"])
    return table, targets


def print_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    table, targets = rows(res)
    widths = [max(len(r[i]) for r in table) for i in range(4)] if table else [0] * 4
    print()
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))
    print("\nTargets")
    for t in targets:
        v = t["measured"]
        shown = "n/a" if v is None else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}")
        print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']}: measured {shown}")
    return targets


# -- the plot -----------------------------------------------------------------------------------------
def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    short = {"raw": "raw ASGI", "starlette": "Starlette\nStreaming", "sse_starlette": "sse-starlette",
             "fastapi": "fastapi.sse", "ours_null": "ours\n(rec. off)", "ours_sqlite": "ours\n(SQLite)"}
    colors = {"raw": "#999999", "starlette": "#bbbbbb", "sse_starlette": "#e69f00", "fastapi": "#56b4e9",
              "ours_null": "#66c2a5", "ours_sqlite": "#1b7837"}

    ax = axes[0][0]
    ip = res.get("inprocess")
    if ip:
        names = list(ip["events_per_s"])
        vals = [ip["events_per_s"][n]["median"] for n in names]
        ax.bar([short[n] for n in names], vals, color=[colors[n] for n in names])
        ax.set_yscale("log")
        ax.set_title(f"1. In-process throughput ({ip['events_per_run']:,} events)")
        ax.set_ylabel("events/s (median, log)")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v / 1e3:,.0f}k", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)

    ax = axes[0][1]
    sv = res.get("server")
    stack = "uvicorn-httptools-uvloop"
    if sv and sv.get(stack):
        st = sv[stack]
        concs = [c for c in (1, 10, 100) if f"streams_{c}" in st]
        names = list(st[f"streams_{concs[0]}"])
        width = 0.8 / len(names)
        for j, n in enumerate(names):
            ax.bar([i + j * width for i in range(len(concs))], [st[f"streams_{c}"][n]["median"] for c in concs],
                   width, label=short[n].replace("\n", " "), color=colors[n])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(concs))], [f"{c} stream(s)" for c in concs])
        ax.set_title(f"2. Under uvicorn ({stack}), total events/s")
        ax.set_ylabel("events/s (median)")
        ax.legend(fontsize=7)

    ax = axes[0][2]
    rc = res.get("recorder")
    if rc:
        labels, vals, cols = [], [], []
        for streams in (1, 100):
            s = rc[f"streams_{streams}"]
            labels += [f"buffered\n{streams} str.", f"naive\n{streams} str."]
            vals += [s["buffered"]["median"], s["naive"]["median"]]
            cols += ["#1b7837", "#d95f02"]
        b = rc["batched_paths"]
        labels += ["batches:\nto_thread", "batches:\naiosqlite"]
        vals += [b["to_thread"]["median"], b["aiosqlite"]["median"]]
        cols += ["#1b7837", "#7570b3"]
        e = rc["event_loops"]
        labels += ["buffered\nasyncio", "buffered\ntrio"]
        vals += [e["asyncio"]["median"], e["trio"]["median"]]
        cols += ["#1b7837", "#e7298a"]
        ax.bar(labels, vals, color=cols)
        ax.axhline(300_000, ls="--", color="red", lw=1, label="target 300k/s")
        ax.set_yscale("log")
        ax.set_title("3. Recorder: chunks/s into SQLite")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v / 1e3:,.0f}k", ha="center", va="bottom", fontsize=7)

    ax = axes[1][0]
    if sv and sv.get("ttfb"):
        t = sv["ttfb"]
        names = ["raw", "ours_null", "ours_sqlite"]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [t[n]["first_event_ms_median"] for n in names], 0.4, label="median")
        ax.bar([i + 0.2 for i in x], [t[n]["first_event_ms_p99"] for n in names], 0.4, label="p99")
        ax.set_xticks(list(x), [short[n] for n in names])
        ax.set_title("4. Time to first event (fresh connection)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)

    ax = axes[1][1]
    mm = res.get("memory")
    if mm:
        names = list(mm["idle"])
        vals = [mm["idle"][n]["rss_per_stream_kib"] for n in names]
        ax.bar([n.replace("_via_", "\nvia ") for n in names], vals,
               color=[{"ours": colors["ours_sqlite"], "raw_asgi": colors["raw"],
                       "raw_asgi_via_middleware": colors["starlette"]}.get(n, colors.get(n, "#cccccc"))
                      for n in names])
        ax.axhline(20, ls="--", color="red", lw=1, label="target 20 KiB")
        n = mm["idle"]["ours"]["runs"][0]["streams"]
        lo = mm["loss"]
        ax.set_title(f"5. RSS per idle stream ({n:,} open)\nloss at {lo['streams']}x{lo['tokens_per_stream']}: "
                     f"{lo['lost']} lost, {lo['duplicated']} duplicated")
        ax.set_ylabel("KiB per stream")
        ax.legend(fontsize=8)

    ax = axes[1][2]
    dc = res.get("disconnect")
    if dc:
        labels, med, p99 = [], [], []
        for stack_name, d in dc["stacks"].items():
            for n, e in d.items():
                labels.append(f"{n}\n{stack_name.replace('uvicorn-', '')}")
                med.append(e["median_ms"])
                p99.append(e["p99_ms"])
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], med, 0.4, label="median")
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
        ax.axhline(50, ls="--", color="red", lw=1, label="target p99 50 ms")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title("6. Disconnect: socket close to generator finally")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)

    meta = res.get("meta", {})
    fig.suptitle(f"asgi_stream_recorder benchmarks ({'quick' if meta.get('quick') else 'full'} run, "
                 f"{meta.get('machine', {}).get('cores')} cores, Python {meta.get('machine', {}).get('python')}, "
                 f"medians of alternating rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run that finishes in under a minute")
    parser.add_argument("--only", action="append", choices=FAMILIES, help="run only this family (repeatable)")
    parser.add_argument("--out", default=str(RESULTS), help="directory for latest.json and latest.png "
                        "(quick.json and quick.png with --quick)")
    parser.add_argument("--report", action="store_true", help="run nothing: print the table and redraw the plot "
                        "from the existing latest.json (quick.json with --quick)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"  # a smoke run never overwrites the full run's figures
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"

    results: dict[str, Any] = {}
    if args.report:
        results = json.loads(json_path.read_text())
        results["targets"] = print_table(results)
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        plot(results, png_path)
        return 0
    if args.only and json_path.exists():
        results = json.loads(json_path.read_text())
    families = args.only or FAMILIES
    failed: list[str] = []
    started = time.time()
    meta = {"quick": args.quick, "families_run": families, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine()}
    for name in families:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        try:
            results[name] = module.main(args.quick)
        except Exception as exc:  # one family failing must not lose the others
            import traceback

            traceback.print_exc()
            print(f"!! {name} failed: {exc!r}", file=sys.stderr, flush=True)
            results.pop(name, None)
            failed.append(name)
            continue
        results[name]["seconds"] = time.perf_counter() - t0
        results[name]["quick"] = args.quick
        print(f"   {name}: {results[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    meta["seconds"] = time.time() - started
    meta["failed"] = failed
    meta["machine"]["load_average_at_end"] = os.getloadavg()
    results["meta"] = meta
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    targets = print_table(results)
    results["targets"] = targets
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    plotted = plot(results, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if plotted else "") + f" in {meta['seconds']:.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
