"""Running `cnnlab.cli.main` in-process and checking that a user's mistake is one clear line."""

from __future__ import annotations

from typing import Sequence

import pytest

from cnnlab.cli import EXIT_USAGE, main


def usage_error(argv: Sequence[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI on argv; assert exit status 2 and a single `cnnlab: error:` line on stderr; return it.

    argparse's own errors leave through SystemExit, the API's CnnlabError through main's return value.
    """
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:"), err
    return lines[0]
