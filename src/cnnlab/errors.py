"""Errors a user can cause.

The CLI prints these as one line and exits with status 2; everything else is a bug.
"""


class CnnlabError(Exception):
    """A problem with the user's input: bad flag, missing data, unknown name."""


class DatasetNotFound(CnnlabError):
    """A dataset's files are not on disk and could not be downloaded."""
