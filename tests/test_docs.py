"""The docs test for README.md: every command and Python snippet runs, as marked (the convention and
how each kind of line runs: tests/mddocs.py; the world the docs assume: tests/docs_setup.py), and
BENCHMARKS.md's commands parse. The tutorials have their own module (test_docs_tutorial.py), so that
the two run on different xdist workers.

One test per block, in file order; the blocks of one file share a workspace and run in order.
"""

from __future__ import annotations

import re
from pathlib import Path

import mddocs
import pytest
from docs_setup import ROOT, data_folder, needs_fmnist, one_thread, params, run_in_workspace, workspace

__all__ = ["data_folder", "one_thread", "workspace"]  # fixtures this module uses
pytestmark = needs_fmnist


@pytest.mark.parametrize("block", params(["README.md", "BENCHMARKS.md"]))
def test_block(block: mddocs.Block, workspace, data_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block runs in its file's workspace (or is written, or its flags checked, or skipped)."""
    run_in_workspace(block, workspace, data_folder, monkeypatch)


def test_benchmark_commands_in_the_readme_parse() -> None:
    """`python -m benchmarks ...` in the README's prose parses with the benchmarks' own parser."""
    spans = re.findall(r"`(python -m benchmarks[^`]*)`", (ROOT / "README.md").read_text())
    assert spans
    for span in spans:
        mddocs.check_synopsis(span, f"README.md: `{span}`")
