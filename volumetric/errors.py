"""Error types shared by every volscan package.

`VolscanError` subclasses `ValueError` so library users can catch either; the CLI turns any
`VolscanError` into one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from os import PathLike


class VolscanError(ValueError):
    """A problem with the user's input or settings, explained in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (third-party errors can span pages), or its type name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InputFileError(VolscanError):
    """A specific input file is unusable; the message names the file and the problem."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
