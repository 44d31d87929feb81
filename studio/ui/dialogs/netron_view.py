"""The original and the pruned graph side by side in Netron (View ▸ Graphs (Netron)…).

Each side is a :class:`~studio.core.export.netron_server.NetronServer` on 127.0.0.1 shown in a
QtWebEngine view. The views share one off-the-record profile (nothing is stored on disk) whose
request interceptor lets through only requests to the studio's own Netron servers and blocks,
and records, everything else (``blocked_urls``): the served page already turns off netron's
consent lookup and usage reporting, the interceptor makes sure nothing leaves the machine.
Closing the dialog stops both servers and deletes the temporary ONNX files.

Where QtWebEngine is not installed, the graphs open in the system browser instead and the
studio says so in the dialog and the log.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QCloseEvent, QDesktopServices
from PySide6.QtWidgets import (
    QDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core.export.netron_server import HOST, NetronServer
from studio.core.models.loaded import LoadedModel
from studio.ui.dialogs.export_dialog import model_choices
from studio.ui.runner import Job, JobRunner
from studio.ui.session import WARNING, Session

RENDER_POLL_MS = 250
RENDER_TIMEOUT_MS = 30_000

_webengine: Any = None  # the QtWebEngine modules, once imported; False where missing
_profile: Any = None
_interceptor: Any = None
blocked_urls: list[str] = []  # requests the interceptor refused, this process
allowed_ports: set[int] = set()


def webengine_available() -> bool:
    """Import QtWebEngine once (as root with Chromium's sandbox off, which root cannot use)."""
    global _webengine
    if _webengine is None:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags = os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", "")
            if "--no-sandbox" not in flags:
                os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] = f"{flags} --no-sandbox".strip()
        try:
            from PySide6 import QtWebEngineCore, QtWebEngineWidgets
        except ImportError:
            _webengine = False
        else:
            _webengine = (QtWebEngineCore, QtWebEngineWidgets)
    return _webengine is not False


def _shared_profile() -> Any:
    """One off-the-record profile with the local-only request interceptor (lives with the app)."""
    global _profile
    if _profile is None:
        from PySide6.QtWidgets import QApplication

        core = _webengine[0]

        class LocalOnly(core.QWebEngineUrlRequestInterceptor):
            def interceptRequest(self, info: Any) -> None:  # noqa: N802 - Qt's name
                url = info.requestUrl()
                local = url.scheme() in ("http", "ws") and url.host() == HOST
                if not (local and url.port() in allowed_ports) and url.scheme() != "data":
                    blocked_urls.append(url.toString())
                    info.block(True)

        global _interceptor
        _profile = core.QWebEngineProfile(QApplication.instance())
        _interceptor = LocalOnly(_profile)  # the profile does not keep it alive
        _profile.setUrlRequestInterceptor(_interceptor)
    return _profile


class GraphPane(QWidget):
    """One Netron view: a title, the web view (or the browser fallback), and a status line."""

    rendered = Signal()

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.server: NetronServer | None = None
        self.view: Any = None
        self.title = QLabel(f"<b>{title}</b>")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.browser_button = QPushButton("Open in browser")
        self.browser_button.setEnabled(False)
        self.browser_button.clicked.connect(self.open_in_browser)
        head = QHBoxLayout()
        head.addWidget(self.title, 1)
        head.addWidget(self.browser_button)
        self.box = QVBoxLayout(self)
        self.box.setContentsMargins(0, 0, 0, 0)
        self.box.addLayout(head)
        if webengine_available():
            widgets = _webengine[1]
            page = _webengine[0].QWebEnginePage(_shared_profile(), self)
            self.view = widgets.QWebEngineView(self)
            self.view.setPage(page)
            self.box.addWidget(self.view, 1)
        else:
            self.box.addStretch(1)
        self.box.addWidget(self.status)
        self._polls = 0
        self._poll = QTimer(self)
        self._poll.setInterval(RENDER_POLL_MS)
        self._poll.timeout.connect(self._check_rendered)

    def show_file(self, path: Path) -> None:
        """Serve ``path`` and show it (in the view, or in the system browser without one)."""
        self.stop()
        self.server = NetronServer(path)
        allowed_ports.add(self.server.address[1])
        self.browser_button.setEnabled(True)
        self.status.setText(f"{path.name} — served at {self.server.url} (this machine only)")
        if self.view is None:
            self.status.setText(
                f"QtWebEngine is not installed: {path.name} opened in the web browser at "
                f"{self.server.url}"
            )
            self.open_in_browser()
            return
        self._polls = 0
        self.view.load(QUrl(self.server.url))
        self._poll.start()

    def open_in_browser(self) -> None:
        if self.server is not None:
            QDesktopServices.openUrl(QUrl(self.server.url))

    def _check_rendered(self) -> None:
        """netron marks the page ``default`` once the graph is drawn (``welcome`` while not)."""
        self._polls += 1
        if self._polls * RENDER_POLL_MS > RENDER_TIMEOUT_MS:
            self._poll.stop()
            self.rendered.emit()
            return
        self.view.page().runJavaScript("document.body.className", 0, self._on_class)

    def _on_class(self, name: object) -> None:
        if self._poll.isActive() and isinstance(name, str) and "default" in name.split():
            self._poll.stop()
            self.rendered.emit()

    def stop(self) -> None:
        """Stop the server (idempotent); the view shows nothing."""
        self._poll.stop()
        if self.server is not None:
            allowed_ports.discard(self.server.address[1])
            self.server.stop()
            self.server = None
        if self.view is not None:
            self.view.setUrl(QUrl("about:blank"))
        self.browser_button.setEnabled(False)


def graph_file(model: LoadedModel, folder: Path, name: str, opened: bool = False) -> Path:
    """An ONNX file of ``model`` for the viewer: the opened .onnx itself (``opened``: ``model``
    is the loaded model, not a pruned copy that kept its path), else an export to ``folder``."""
    if opened and model.path is not None and model.path.suffix.lower() == ".onnx":
        return model.path
    from studio.core.export.exporter import export_model

    return export_model(model, "onnx", folder / f"{name}.onnx", measure_latency=False).path


class GraphsDialog(QDialog):
    """The original (loaded) model and the chosen pruned one side by side in Netron."""

    ready = Signal()  # both sides rendered (or gave up)
    error = Signal(str, str)

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Graphs — original and pruned (Netron)")
        self.session, self.runner = session, runner
        self.folder = Path(tempfile.mkdtemp(prefix="studio-graphs-"))
        self.job: Job | None = None
        self.left = GraphPane("Original")
        self.right = GraphPane("Pruned")
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.left)
        split.addWidget(self.right)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        box = QVBoxLayout(self)
        box.addWidget(self.message)
        box.addWidget(split, 1)
        self.resize(1300, 800)
        self._pending = 0
        for pane in (self.left, self.right):
            pane.rendered.connect(self._on_rendered)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        if not webengine_available():
            self.message.setText(
                "QtWebEngine is not installed (pip install PySide6-Addons): the graphs open in "
                "the web browser instead."
            )
            session.log("QtWebEngine is not installed: the graphs open in the web browser", WARNING)

    def start(self) -> None:
        """Export what is needed to ONNX in the background, then show both graphs."""
        model = self.session.model
        if model is None:
            self.message.setText("Open a model first.")
            return
        choices = model_choices(self.session)
        label, current = choices[0]
        self.right.title.setText(f"<b>{label}</b>")
        self.left.title.setText(f"<b>Original: {model.name}</b>")
        folder = self.folder
        self.message.setText("Preparing the ONNX graphs…")

        def work(progress: Any, cancel: Any) -> tuple[Path, Path | None]:
            progress(0.0, "original graph")
            left = graph_file(model, folder, "original", opened=True)
            cancel.check()
            if current is model:
                return left, None
            progress(0.5, "pruned graph")
            right = graph_file(current, folder, "pruned")
            return left, right

        self.job = self.runner.start("Graphs for Netron", work)

    def _on_finished(self, job: Job, result: object) -> None:
        if job is not self.job:
            return
        self.job = None
        left, right = result  # type: ignore[misc]
        self._pending = 1 if right is None else 2
        self.left.show_file(left)
        if right is None:
            self.right.status.setText("Nothing pruned yet: only the original is shown.")
        else:
            self.right.show_file(right)
        where = "below" if self.left.view is not None else "in the web browser"
        self.message.setText(f"Netron {where}, served on {HOST} only; closing this stops it.")
        self.session.log(f"Netron: {left.name} at {self.left.server.url}")  # type: ignore[union-attr]
        if self.left.view is None:
            self.ready.emit()

    def _on_failed(self, job: Job, message: str) -> None:
        if job is self.job:
            self.job = None
            self.message.setText(f"Could not prepare the graphs: {message}")
            self.error.emit("Graphs", message)

    def _on_rendered(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self.ready.emit()

    def stop(self) -> None:
        """Stop both servers and delete the temporary files (idempotent)."""
        if self.job is not None:
            self.job.cancel()
        self.left.stop()
        self.right.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def done(self, code: int) -> None:
        self.stop()
        super().done(code)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt's name
        self.stop()
        super().closeEvent(event)
