"""Starting the GUI: the QApplication, the main window, and the screenshot mode."""

from __future__ import annotations

import os
import sys

from PySide6.QtCore import QPointF, QRectF, Qt, QTimer
from PySide6.QtGui import QBrush, QColor, QIcon, QPainter, QPen, QPixmap
from PySide6.QtWidgets import QApplication

from studio.core import isolation
from studio.core.cluster.connection import Compute
from studio.core.models.load import is_folder_spec
from studio.ui.compat import binding_problem
from studio.ui.main_window import MainWindow
from studio.ui.session import WARNING
from studio.ui.settings import APPLICATION, ORGANIZATION
from studio.ui.workflow import ModelRequest

SCREENSHOT_TIMEOUT_S = 600


def app_icon() -> QIcon:
    """A small drawn icon: a network whose last links are pruned away."""
    icon = QIcon()
    for size in (16, 32, 64, 128):
        pixmap = QPixmap(size, size)
        pixmap.fill(Qt.GlobalColor.transparent)
        p = QPainter(pixmap)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        s = size / 64
        p.setBrush(QBrush(QColor("#1f6feb")))
        p.setPen(Qt.PenStyle.NoPen)
        p.drawRoundedRect(QRectF(2 * s, 2 * s, 60 * s, 60 * s), 12 * s, 12 * s)
        left = [QPointF(18 * s, y * s) for y in (18, 32, 46)]
        right = [QPointF(46 * s, y * s) for y in (22, 42)]
        p.setPen(QPen(QColor("#dbe9ff"), max(1.0, 3 * s)))
        for i, a in enumerate(left):
            for j, b in enumerate(right):
                if (i + j) % 2 == 0:
                    p.drawLine(a, b)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QBrush(QColor("white")))
        for point in left + right:
            p.drawEllipse(point, 5 * s, 5 * s)
        p.end()
        icon.addPixmap(pixmap)
    return icon


def application() -> QApplication:
    """The running QApplication, created (with name and icon) if there is none yet."""
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication(sys.argv[:1])
    app.setApplicationName(APPLICATION)
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationDisplayName(APPLICATION)
    app.setWindowIcon(app_icon())
    return app


def _display_available() -> bool:
    """Whether Qt can open a window here (an explicit QT_QPA_PLATFORM is trusted)."""
    if os.environ.get("QT_QPA_PLATFORM") or not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_gui(
    model_spec: str | None = None,
    data_spec: str | None = None,
    screenshot: str | None = None,
    tab: str | None = None,
    scan: bool = False,
    recipe: str | None = None,
    apply: bool = False,
    finetune: int | None = None,
    latency: bool = False,
    compute: Compute | None = None,
    seq_len: int | None = None,
) -> int:
    """Open the studio, optionally with a model and data; return the exit status.

    ``tab`` is the tab shown first; ``scan`` starts a sensitivity scan with the default
    settings as soon as the model and data are in (and shows the Sensitivity tab); ``recipe``
    is loaded into the Planner once the model's targets are known, and with ``apply`` applied
    once the data is in; ``finetune`` (epochs) fine-tunes the pruned model in the Training tab;
    ``latency`` measures every variant in the Latency tab once the last of those is in;
    ``compute`` (this session only, not saved) says where scans and fine-tuning run;
    ``seq_len`` is the sequence length of a language model from a folder (its input shape,
    and the length its text data is cut into).

    With ``screenshot``, no dialogs are shown: once every job has ended the window is saved
    to that PNG file and the function returns 0, or 1 with a one-line message on stderr if
    loading failed.
    """
    if QApplication.instance() is None and not _display_available():
        if screenshot is None:
            print(
                "studio: error: no display found (DISPLAY and WAYLAND_DISPLAY are unset): run "
                "the studio in a desktop session, or under a virtual one with `xvfb-run -a studio`",
                file=sys.stderr,
            )
            return 1
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # a screenshot needs no screen
    if model_spec and is_folder_spec(model_spec):
        isolation.preload_transformers()  # before the window's runner starts the job server
    app = application()
    window = MainWindow(interactive=screenshot is None)
    problem = binding_problem()
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
        window.session.log(problem, WARNING)
    if compute is not None:
        window.session.set_compute(compute)
    window.show()
    if tab or scan:
        window.show_tab(tab or "sensitivity")
    if scan:
        window.sensitivity.start_when_ready()
    if recipe:
        window.planner.load_recipe_when_ready(recipe, apply=apply)
    if finetune:
        window.training.start_when_pruned(finetune)
    if latency:
        after = "finetuned" if finetune else "pruned" if recipe and apply else "evaluation"
        window.latency.measure_when_ready(after)
    if model_spec:
        window.open_model(
            ModelRequest(model_spec, input_shape=(1, seq_len)) if seq_len else model_spec
        )
    if data_spec:
        window.open_data(data_spec)
    if screenshot is None:
        return app.exec()

    outcome: list[int] = []

    def finish() -> None:
        if outcome or window.runner.is_busy():
            return
        app.processEvents()  # let the panels repaint with the final state
        if window.errors:
            print(f"error: {window.errors[0]}", file=sys.stderr)
            outcome.append(1)
        elif model_spec and window.session.inventory is None:
            print("error: the model's layers could not be listed", file=sys.stderr)
            outcome.append(1)
        elif not window.grab().save(screenshot):
            print(f"error: could not write the screenshot to {screenshot}", file=sys.stderr)
            outcome.append(1)
        else:
            outcome.append(0)
        window.close()
        app.quit()

    def give_up() -> None:
        if not outcome:
            print(f"error: still busy after {SCREENSHOT_TIMEOUT_S} s", file=sys.stderr)
            outcome.append(1)
            window.close()
            app.quit()

    window.runner.idle.connect(lambda: QTimer.singleShot(100, finish))
    QTimer.singleShot(300, finish)  # nothing to wait for
    QTimer.singleShot(SCREENSHOT_TIMEOUT_S * 1000, give_up)
    app.exec()
    return outcome[0] if outcome else 1
