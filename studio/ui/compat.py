"""Checks on the Qt binding the studio runs on.

PySide6 6.12.0 on Python 3.11 drops one reference to ``None`` on every call of a method that
returns nothing, and one to ``True`` on every ``Signal.emit``. Python 3.12+ makes those objects
immortal, so nothing happens there; on 3.11 the count reaches zero after some thousands of calls
and the interpreter aborts ("Fatal Python error: none_dealloc"). PySide6 6.11 is sound.
"""

from __future__ import annotations

import sys

from PySide6 import __version__ as PYSIDE_VERSION
from PySide6.QtCore import QObject, Signal

PROBE_CALLS = 200


class _Probe(QObject):
    ping = Signal()


def leaked_references(calls: int = PROBE_CALLS) -> dict[str, int]:
    """References to ``None`` and ``True`` lost over ``calls`` void calls and emits."""
    probe = _Probe()
    none_before = sys.getrefcount(None)
    for _ in range(calls):
        probe.setObjectName("probe")
    none_lost = none_before - sys.getrefcount(None)
    true_before = sys.getrefcount(True)
    for _ in range(calls):
        probe.ping.emit()
    true_lost = true_before - sys.getrefcount(True)
    return {"None": none_lost, "True": true_lost}


def binding_problem() -> str | None:
    """A one-line warning if this PySide6 build loses references (it will crash), else None."""
    if sys.version_info >= (3, 12):  # None and True are immortal: the leak is harmless
        return None
    lost = leaked_references()
    if max(lost.values()) < PROBE_CALLS // 2:
        return None
    return (
        f"PySide6 {PYSIDE_VERSION} loses a reference to None/True on every call under Python "
        f"{sys.version_info.major}.{sys.version_info.minor} and will crash the studio after a "
        "while (Fatal Python error: none_dealloc); install PySide6-Essentials<6.12"
    )
