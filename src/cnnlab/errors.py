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


class Preempted(CnnlabError):
    """Training stopped on a signal (SIGTERM, SIGINT) after writing a checkpoint; the CLI exits with
    `exit_status`, 128 + the signal's number, as the signal itself would have."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class DatasetNotFound(CnnlabError):
    """A dataset's files are not on disk and could not be downloaded."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's can run to dozens), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# The extra (`pip install 'cnnlab[EXTRA]'`) that brings each optional module; pyproject.toml lists them.
EXTRAS = {
    **dict.fromkeys(("fastapi", "uvicorn", "starlette", "pydantic", "multipart", "python_multipart",
                     "prometheus_client", "fastapi_offline"), "serve"),
    **dict.fromkeys(("onnx", "onnxruntime", "onnxscript"), "export"),
    "matplotlib": "report",
    "tensorboard": "tensorboard",
}


class MissingExtra(CnnlabError):
    """A command needs a package from one of cnnlab's optional extras that is not installed."""


def missing_extra(exc: ImportError) -> MissingExtra | None:
    """The one-line error for an ImportError of an optional module; None for any other import error."""
    module = (getattr(exc, "name", None) or "").partition(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    return MissingExtra(f"This command needs the {module} package, which is not installed: "
                        f"pip install 'cnnlab[{extra}]' (or 'cnnlab[all]').")
