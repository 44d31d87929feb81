"""The Qt binding must not lose references (PySide6 6.12.0 on Python 3.11 does, and crashes)."""

from __future__ import annotations

from studio.ui.compat import binding_problem


def test_qt_binding_keeps_reference_counts() -> None:
    assert binding_problem() is None
