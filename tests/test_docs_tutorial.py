"""The docs test for the tutorial: every command and Python snippet of docs/tutorial.md runs, as
marked (tests/mddocs.py, tests/docs_setup.py), and its Chinese version docs/tutorial.zh-CN.md has
the same blocks: the same code with only its comments translated, and the same program output.

The Chinese blocks are not run a second time: each is compared with the English block at the same
place, which runs here.
"""

from __future__ import annotations

from pathlib import Path

import mddocs
import pytest
from docs_setup import ROOT, blocks, data_folder, needs_fmnist, one_thread, params, run_in_workspace, workspace

__all__ = ["data_folder", "one_thread", "workspace"]  # fixtures this module uses
pytestmark = needs_fmnist
TRANSLATIONS = {"docs/tutorial.zh-CN.md": "docs/tutorial.md"}  # translation -> original


@pytest.mark.parametrize("block", params(["docs/tutorial.md"]))
def test_block(block: mddocs.Block, workspace, data_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block runs in the tutorial's workspace (or is written, or its flags checked, or skipped)."""
    run_in_workspace(block, workspace, data_folder, monkeypatch)


@pytest.mark.parametrize("block", params(list(TRANSLATIONS)))
def test_translated_block(block: mddocs.Block) -> None:
    """A translation's blocks are its original's with only the comments translated: instead of
    running them a second time, each is compared with the original's block at the same place
    (comments and blank lines removed; directives equal, but for a skip's reason)."""
    if block.problem:
        pytest.fail(block.problem, pytrace=False)
    original = blocks(TRANSLATIONS[block.doc])
    n = blocks(block.doc).index(block)
    assert n < len(original), f"{block.id}: {TRANSLATIONS[block.doc]} has only {len(original)} such blocks"
    expected = original[n]
    assert (block.lang, _directives(block)) == (expected.lang, _directives(expected)), \
        f"{block.id}: language or directives differ from {expected.id}"
    assert mddocs.without_comments(block) == mddocs.without_comments(expected), \
        f"{block.id}: the code differs from {expected.id} (only comments may be translated)"


def _directives(block: mddocs.Block) -> list[tuple[str, str]]:
    return [(name, "" if name == "skip" else arg) for name, arg in block.directives]


@pytest.mark.parametrize("doc", list(TRANSLATIONS))
def test_translation_has_every_block_and_the_same_output(doc: str) -> None:
    """As many blocks as the original (test_translated_block compares the code one by one), and
    every block that is shown, not run (program output, layouts), exactly as in the original."""
    if not (ROOT / doc).is_file():
        pytest.skip(f"{doc}: not written")
    translated, original = mddocs.parse(ROOT / doc, doc), mddocs.parse(ROOT / TRANSLATIONS[doc], TRANSLATIONS[doc])
    assert [b.lang for b in translated] == [b.lang for b in original], f"{doc}: the fences differ from the original's"
    for mine, theirs in zip(translated, original):
        if not theirs.acted_on:
            assert mine.text == theirs.text, f"{mine.id} differs from {theirs.id}"
