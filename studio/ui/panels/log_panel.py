"""Log dock: timestamped lines from the session (load notes, job results, errors)."""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING

from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import QPlainTextEdit, QVBoxLayout, QWidget

from studio.ui.session import DETAIL, ERROR, WARNING

if TYPE_CHECKING:
    from studio.ui.session import Session

MAX_LINES = 5000
COLORS = {WARNING: "#b36b00", ERROR: "#c62828", DETAIL: "#7a7a7a"}


class LogPanel(QWidget):
    """Read-only, colour-coded view of ``session.logged``; keeps the last lines only."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.view = QPlainTextEdit(readOnly=True)
        self.view.setMaximumBlockCount(MAX_LINES)
        self.view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.view.setPlaceholderText(
            "Messages about loading, inspecting and evaluating appear here."
        )
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.view)
        self._lines: list[str] = []
        session.logged.connect(self.append)

    def lines(self) -> list[str]:
        """Plain text of every line shown so far (the most recent ``MAX_LINES``)."""
        return list(self._lines)

    def append(self, timestamp: float, level: str, text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(timestamp))
        for i, part in enumerate(text.rstrip("\n").splitlines() or [""]):
            prefix = f"[{stamp}] " if i == 0 else " " * (len(stamp) + 3)
            self._lines.append(prefix + part)
            body = html.escape(prefix + part).replace("  ", "&nbsp;&nbsp;")
            color = COLORS.get(level)
            if color:
                body = f'<span style="color:{color}">{body}</span>'
            self.view.appendHtml(body)
        del self._lines[:-MAX_LINES]
        bar = self.view.verticalScrollBar()
        bar.setValue(bar.maximum())
