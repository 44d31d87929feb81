"""The report as a PDF: the report's HTML laid out by Qt's rich-text engine and printed.

``QTextDocument`` does not read ``data:`` image URIs, so each embedded PNG is handed to the
document as a resource under a short name first. Works without a display (the CLI runs it
under the offscreen platform when there is no QGuiApplication yet).
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
from pathlib import Path

from PySide6.QtCore import QMarginsF, QSizeF, QUrl
from PySide6.QtGui import QImage, QPageLayout, QPageSize, QPdfWriter, QTextDocument

from studio.core.files import write_atomic

_IMAGE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
RESOLUTION = 96  # dots per inch: the report's pixel sizes are screen pixels


def _application() -> object:
    from PySide6.QtGui import QGuiApplication

    app = QGuiApplication.instance()
    if app is None:
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        app = QGuiApplication(["studio"])
    return app


def html_to_pdf(html: str, path: str | Path, protected: tuple[Path, ...] = ()) -> Path:
    """Lay out ``html`` on A4 pages and write the PDF atomically to ``path``."""
    app = _application()
    images: list[QImage] = []

    def name(match: re.Match[str]) -> str:
        image = QImage()
        image.loadFromData(base64.b64decode(match.group(1)), "PNG")
        images.append(image)
        return f'src="studio-image:{len(images) - 1}"'

    text = _IMAGE.sub(name, html)
    doc = QTextDocument()
    for i, image in enumerate(images):
        doc.addResource(QTextDocument.ResourceType.ImageResource, QUrl(f"studio-image:{i}"), image)
    doc.setHtml(text)
    with tempfile.TemporaryDirectory(prefix="studio-pdf-") as folder:
        scratch = Path(folder) / "report.pdf"
        writer = QPdfWriter(str(scratch))
        writer.setResolution(RESOLUTION)
        writer.setPageSize(QPageSize(QPageSize.PageSizeId.A4))
        writer.setPageMargins(QMarginsF(12, 12, 12, 12), QPageLayout.Unit.Millimeter)
        writer.setTitle(doc.metaInformation(QTextDocument.MetaInformation.DocumentTitle))
        writer.setCreator("Pruning Studio")
        layout = writer.pageLayout().paintRectPixels(RESOLUTION)
        doc.setPageSize(QSizeF(layout.width(), layout.height()))
        doc.print_(writer)
        del writer  # finishes the file
        data = scratch.read_bytes()
    del app
    return write_atomic(path, data, protected)
