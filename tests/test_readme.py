"""README's code is part of the contract: every Python block parses, and the complete test file
it offers users passes as written."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_every_python_block_in_readme_parses() -> None:
    assert len(BLOCKS) >= 10
    for block in BLOCKS:
        # Snippets may await at top level (as in a REPL or inside your handler).
        compile(block, "README.md", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_example_test_file_in_readme_passes(tmp_path: Path) -> None:
    start = README.index("A complete test file you can copy")
    example = re.search(r"```python\n(.*?)```", README[start:], re.S)
    assert example is not None
    (tmp_path / "test_example.py").write_text(example.group(1), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None and int(passed.group(1)) >= 3 and "failed" not in result.stdout
