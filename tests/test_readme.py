"""README's code is part of the contract: every Python block in it runs, or is an excerpt of a
file the suite runs, with the conventions (and the code) of ``tests/test_docs.py``:

- the Quick start block is marked ``<!-- setup -->``: it runs before every other block, so the
  README's later blocks may use its ``app`` and ``recorder``;
- ``<!-- excerpt: docs/page.md -->`` marks a short block whose every line is in a block of that
  page that runs (the page has the complete, runnable version);
- ``<!-- pytest -->`` marks the complete test file offered to users: it is run with pytest and
  must pass as written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_docs import ROOT, Block, blocks_in, check_excerpt, check_markers, run_block

README = ROOT / "README.md"
BLOCKS = blocks_in(README)


def test_every_python_block_in_readme_is_accounted_for() -> None:
    assert len(BLOCKS) >= 15
    check_markers(README)
    assert [b.kind for b in BLOCKS].count("setup") == 1, "one setup block: the Quick start"
    assert any(b.kind == "pytest" for b in BLOCKS), "the complete test file users may copy"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind in ("run", "pytest")], ids=lambda b: b.where)
def test_readme_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_block(block, BLOCKS, tmp_path, monkeypatch)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "excerpt"], ids=lambda b: b.where)
def test_readme_excerpt_comes_from_a_file_the_suite_runs(block: Block) -> None:
    check_excerpt(block)
