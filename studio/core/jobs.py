"""Progress reporting and cancellation shared by every long core operation.

A long operation takes ``progress: ProgressFn | None`` and ``cancel: CancelToken | None``.
The CLI passes a terminal progress bar, the GUI's job runner a signal emitter; both pass a
token whose ``cancel()`` makes the operation raise :class:`Cancelled` at its next check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from studio.core.errors import Cancelled

# progress(fraction in [0, 1], message)
ProgressFn = Callable[[float, str], None]


class _Watched:
    """Callbacks run (on the changing thread) whenever the token changes: how a job in
    another process (studio.core.isolation) hears of it at once."""

    def __init__(self) -> None:
        self._watchers: list[Callable[[], None]] = []

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change; returns the function that stops it."""
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback) if callback in self._watchers else None

    def _changed(self) -> None:
        for callback in list(self._watchers):
            callback()


class CancelToken(_Watched):
    """Thread-safe flag checked by long operations between steps."""

    def __init__(self) -> None:
        super().__init__()
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()
        self._changed()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled()


def check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


def report(progress: ProgressFn | None, fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def sub_progress(progress: ProgressFn | None, start: float, end: float) -> ProgressFn | None:
    """Map a sub-step's 0..1 progress into the slice ``start..end`` of the whole."""
    if progress is None:
        return None

    def mapped(fraction: float, message: str) -> None:
        progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)

    return mapped


class PauseToken(_Watched):
    """Thread-safe pause flag: a long job calls :meth:`wait` between steps and blocks there
    while paused; a cancel request ends the wait promptly with :class:`Cancelled`."""

    POLL_SECONDS = 0.05

    def __init__(self) -> None:
        super().__init__()
        self._running = threading.Event()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()
        self._changed()

    def resume(self) -> None:
        self._running.set()
        self._changed()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait(self, cancel: CancelToken | None = None) -> None:
        """Return at once unless paused; while paused, block until resumed or cancelled."""
        while not self._running.wait(self.POLL_SECONDS):
            check(cancel)
        check(cancel)


def drain(items: Iterator[Any], cancel: CancelToken, on_item: Callable[[Any], None]) -> Any:
    """Pass each item of a stream job's generator to ``on_item`` (checking ``cancel`` before
    each) and return the generator's ``return`` value."""
    while True:
        try:
            item = next(items)
        except StopIteration as stop:
            return stop.value
        cancel.check()
        on_item(item)
