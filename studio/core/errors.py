"""The one exception type the user sees: its message is a single, complete sentence."""

from __future__ import annotations

import re

ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # torch and Ray colour parts of their messages


class StudioError(Exception):
    """An error caused by the user's input or environment, shown as one line, no traceback."""


class Cancelled(StudioError):
    """Raised inside a job when its cancel token is set."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes."""
    text = ANSI_CODES.sub("", str(error)).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line if len(line) <= 240 else line[:237] + "..."


class UntrustedPickleError(StudioError):
    """Loading the file would run code from it; the GUI catches this to ask the user first."""


TRUST_HINT = "pass --trust-pickle (CLI) or confirm in the dialog (GUI) only if you trust its source"
