"""One line under a result: how much faster than the original the variant runs (measured side
by side), or that it is not, why, and a button for the fix (re-plan with runtime channels)."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from studio.core.latency.speed_check import SpeedCheck

FAST_COLOUR = "#2e7d32"
SLOW_COLOUR = "#c62828"


class SpeedLine(QWidget):
    """Shows a :class:`SpeedCheck` of one variant; hidden until there is one."""

    fix = Signal()  # the user asked to re-plan with runtime channels

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.fix_button = QPushButton("Re-plan with runtime channels")
        self.fix_button.setToolTip(
            "Allocate the same target again with channel counts the runtime runs fast, and apply"
        )
        self.fix_button.clicked.connect(lambda _=False: self.fix.emit())
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.label, 1)
        row.addWidget(self.fix_button)
        self.check: SpeedCheck | None = None
        self.show_check(None)

    def show_pending(self, kind: str) -> None:
        self.check = None
        self.label.setText(f"Timing the {kind} model against the original…")
        self.fix_button.hide()
        self.show()

    def show_check(self, check: SpeedCheck | None) -> None:
        self.check = check
        if check is None:
            self.label.clear()
            self.fix_button.hide()
            self.hide()
            return
        colour = FAST_COLOUR if check.faster else SLOW_COLOUR
        text = html.escape(check.line(), quote=False)
        self.label.setText(f'<span style="color:{colour}">{text}</span>')
        self.label.setToolTip(check.reason() or check.settings())
        self.fix_button.setVisible(not check.faster and bool(check.off_path))
        self.show()
