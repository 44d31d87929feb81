"""The one exception type the user sees: its message is a single, complete sentence."""

from __future__ import annotations


class StudioError(Exception):
    """An error caused by the user's input or environment, shown as one line, no traceback."""


class Cancelled(StudioError):
    """Raised inside a job when its cancel token is set."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)
