"""Errors a user can cause.

The CLI prints these as one line and exits with status 2; everything else is a bug.
"""


class CnnlabError(Exception):
    """A problem with the user's input: bad setting, missing data, unknown name."""


class InvalidSetting(CnnlabError):
    """A setting with a value it cannot take, named as the Python API names it (`batch_size`).

    The message reads "<setting> <problem>"; the CLI shows the setting as its flag (`--batch-size`)."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


class DatasetNotFound(CnnlabError):
    """A dataset's files are not on disk and could not be downloaded."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's can run to dozens), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
