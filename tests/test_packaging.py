"""The package as users install it: the wheel built from this tree, installed (not editable) into
a fresh virtual environment with its ``[server]`` extra from the package index, then its command
line run and its viewer served from there."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import anyio
import httpx
import pytest

from asgi_stream_recorder import SQLiteRecorder
from asgi_stream_recorder.session import StreamSession

from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, timeout: float = 300, cwd: Path | None = None) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


async def record_one(db: Path) -> str:
    async with SQLiteRecorder(db) as recorder:
        session = StreamSession(recorder, metadata={"from": "the dev tree"})
        session.begin()
        for token in ["packaged ", "and ", "installed"]:
            session.stamp()
            await session.record(token, None)
        session.end(exhausted=True)
    return session.id


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel of this tree installed; its bin directory."""
    where = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", where / "dist",
        ROOT, timeout=300)
    [wheel] = (where / "dist").glob("asgi_stream_recorder-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "asgi_stream_recorder/py.typed" in names
    assert any(name.endswith("LICENSE") for name in names), "the wheel carries no LICENSE"
    viewer = [name for name in names if name.startswith("asgi_stream_recorder/viewer/")]
    assert any(name.endswith((".html", ".js", ".css")) for name in viewer), f"no viewer assets in {names}"
    venv = where / "venv"
    run(sys.executable, "-m", "venv", venv, timeout=120)
    bin_dir = venv / "bin"
    run(bin_dir / "pip", "install", "-q", f"{wheel}[server]", timeout=600)
    return bin_dir


def test_the_installed_package_is_the_wheel_not_this_tree(installed: Path, tmp_path: Path) -> None:
    where = run(installed / "python", "-c", "import asgi_stream_recorder; print(asgi_stream_recorder.__file__)",
                cwd=tmp_path)
    assert where.startswith(str(installed.parent)) and "site-packages" in where


def test_its_command_line_reads_what_this_tree_recorded(installed: Path, tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    sid = anyio.run(record_one, db)
    listing = run(installed / "asgi-stream-recorder", "--db", db, "list", cwd=tmp_path)
    assert sid in listing and "completed" in listing
    shown = run(installed / "python", "-m", "asgi_stream_recorder", "--db", db, "show", sid, cwd=tmp_path)
    assert "packaged and installed" in shown


def test_its_viewer_serves_pages_from_the_installed_files(installed: Path, tmp_path: Path) -> None:
    db = tmp_path / "streams.db"
    sid = anyio.run(record_one, db)
    port = free_port()
    code = ("import uvicorn, sys; from asgi_stream_recorder import SQLiteRecorder, streams_app; "
            f"uvicorn.run(streams_app(recorder=SQLiteRecorder({str(db)!r})), host='127.0.0.1', port={port}, "
            "log_level='warning')")
    server = subprocess.Popen([str(installed / "python"), "-c", code], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            try:
                listing = httpx.get(f"{base}/", headers={"accept": "application/json"}, timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the installed viewer did not answer in 30 s"
                time.sleep(0.1)
        assert sid in listing.text
        page = httpx.get(f"{base}/{sid}", headers={"accept": "text/html"}, timeout=5)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assets = [part.split('"', 1)[0] for part in page.text.split('src="')[1:] + page.text.split('href="')[1:]]
        local = [a for a in assets if a and not a.startswith(("http:", "https:", "//", "#", "data:"))]
        assert local, page.text[:500]
        for asset in local:
            url = asset if asset.startswith("/") else f"{base}/{asset}"
            url = url if url.startswith("http") else f"{base}{url}"
            got = httpx.get(url, timeout=5)
            assert got.status_code == 200 and got.content, (asset, got.status_code)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()
    assert os.path.exists(db)


@pytest.mark.parametrize(("module", "extra"), [("django", "django"), ("quart", "quart")])
def test_framework_adapters_name_their_extra(installed: Path, tmp_path: Path, module: str, extra: str) -> None:
    """Without the framework installed the package still imports; its adapter says what to install."""
    code = (f"import asgi_stream_recorder\ntry:\n    import asgi_stream_recorder.integrations.{module}\n"
            f"except ImportError as exc:\n    print(exc)\n")
    said = run(installed / "python", "-c", code, cwd=tmp_path)
    assert f"asgi-stream-recorder[{extra}]" in said
