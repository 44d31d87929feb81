"""What every chart shares: a light pyqtgraph style, and saving as PNG and CSV atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyqtgraph as pg
from PySide6.QtCore import QBuffer, QIODevice
from PySide6.QtWidgets import QFileDialog, QWidget

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


def save_with_dialog(
    parent: QWidget,
    title: str,
    suggested: str,
    file_filter: str,
    save: Callable[[str], Path],
    session: Session,
) -> str | None:
    """Ask where, save, and log it; the one-line error message if saving failed."""
    path = ask_save_path(parent, title, suggested, file_filter)
    if not path:
        return None
    try:
        written = save(path)
    except StudioError as exc:
        session.log(f"Could not save: {exc}", ERROR)
        return str(exc)
    session.log(f"Saved {written}")
    return None
