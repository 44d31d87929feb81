"""What every chart shares: a light pyqtgraph style, and saving as PNG and CSV atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyqtgraph as pg
from PySide6.QtCore import QBuffer, QIODevice
from PySide6.QtWidgets import QFileDialog, QPushButton, QWidget

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.ui.session import ERROR

if TYPE_CHECKING:
    from studio.ui.session import Session

pg.setConfigOptions(antialias=True, background="w", foreground="#333333")

PNG_FILTER = "PNG image (*.png)"
CSV_FILTER = "CSV table (*.csv)"


def png_bytes(widget: QWidget) -> bytes:
    """The widget as it looks on screen, encoded as PNG."""
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    widget.grab().save(buffer, "PNG")
    return bytes(buffer.data().data())


def save_png(widget: QWidget, path: str | Path, protected: tuple[Path, ...] = ()) -> Path:
    """Write the widget as a PNG file, whole or not at all."""
    return write_atomic(path, png_bytes(widget), protected)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def ask_save_path(parent: QWidget, title: str, suggested: str, file_filter: str) -> str | None:
    """The path the user chose (with the filter's extension added if missing), or None."""
    path, _ = QFileDialog.getSaveFileName(parent, title, suggested, file_filter)
    if not path:
        return None
    suffix = ".png" if file_filter == PNG_FILTER else ".csv"
    return path if path.lower().endswith(suffix) else path + suffix


def model_stem(session: Session) -> str:
    """The first word of the model's name, for suggested file names."""
    return session.model.name.split()[0] if session.model else "model"


class SaveButtons:
    """A panel's "Save PNG…" and "Save CSV…" buttons: ask where, write through the panel's
    ``save_png(path)`` / ``save_csv(path)``, log it, and report a failure to ``on_error``."""

    def __init__(
        self,
        parent: QWidget,
        session: Session,
        save_png: Callable[[str], Path],
        save_csv: Callable[[str], Path],
        suggested: Callable[[str], str],
        titles: tuple[str, str],
        on_error: Callable[[str, str], None],
    ) -> None:
        self.parent, self.session, self.suggested, self.on_error = (
            parent,
            session,
            suggested,
            on_error,
        )
        self.png = QPushButton("Save PNG…")
        self.csv = QPushButton("Save CSV…")
        self.png.clicked.connect(lambda: self._save(save_png, titles[0], ".png", PNG_FILTER))
        self.csv.clicked.connect(lambda: self._save(save_csv, titles[1], ".csv", CSV_FILTER))

    def set_enabled(self, enabled: bool) -> None:
        self.png.setEnabled(enabled)
        self.csv.setEnabled(enabled)

    def _save(self, save: Callable[[str], Path], title: str, suffix: str, filt: str) -> None:
        path = ask_save_path(self.parent, title, self.suggested(suffix), filt)
        if not path:
            return
        try:
            written = save(path)
        except StudioError as exc:
            self.session.log(f"Could not save: {exc}", ERROR)
            self.on_error("Could not save", str(exc))
            return
        self.session.log(f"Saved {written}")
