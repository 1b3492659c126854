"""Errors a user can cause.

The CLI prints these as one line and exits with status 2; everything else is a bug.
"""


class CnnlabError(Exception):
    """A problem with the user's input: bad flag, missing data, unknown name."""


class DatasetNotFound(CnnlabError):
    """A dataset's files are not on disk and could not be downloaded."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's can run to dozens), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
