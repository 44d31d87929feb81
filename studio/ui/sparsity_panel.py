"""The Sparsity tab: how sparse each layer already is, and which of its channels are weak.

Two heatmaps share the layer rows: the fraction of exact zeros per layer, and the norm of
every output channel (relative to the layer's strongest channel by default, so weak channels
stand out in layers of any scale).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.jobs import CancelToken, ProgressFn
from studio.core.sparsity import ChannelNorms, channel_norms
from studio.ui import charts
from studio.ui.heatmap import HeatmapView
from studio.ui.runner import Job, JobRunner
from studio.ui.scan_controls import narrow_combo
from studio.ui.session import ERROR, Session

WEAK = 0.1  # a channel below this fraction of its layer's strongest is called weak
NORMS = {"L2 norm": 2, "L1 norm": 1}
SCALES = ("relative to the layer's strongest channel", "absolute")
SPARSITY_MAP = pg.ColorMap([0.0, 1.0], ["#f7fbff", "#08306b"])


def norm_matrix(layers: list[ChannelNorms], relative: bool) -> np.ndarray:
    """Layers x channels (padded with NaN to the widest layer)."""
    width = max((len(c.norms) for c in layers), default=0)
    grid = np.full((len(layers), width), np.nan)
    for i, c in enumerate(layers):
        norms = c.norms.astype(float)
        top = norms.max() if norms.size else 0.0
        grid[i, : len(norms)] = norms / top if relative and top > 0 else norms
    return grid


def weak_count(layer: ChannelNorms) -> int:
    top = float(layer.norms.max()) if layer.norms.size else 0.0
    return int((layer.norms < WEAK * top).sum()) if top > 0 else len(layer.norms)


class SparsityPanel(QWidget):
    """Per-layer sparsity and per-channel norms of the session's model."""

    error = Signal(str, str)

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.layers: list[ChannelNorms] = []
        self.job: Job | None = None
        self.norm = narrow_combo()
        self.norm.addItems(list(NORMS))
        self.scale = narrow_combo(12)
        self.scale.addItems(list(SCALES))
        self.status = QLabel("Open a model to see its sparsity and channel norms.")
        self.status.setWordWrap(True)
        self.save_png_button = QPushButton("Save PNG…")
        self.save_csv_button = QPushButton("Save CSV…")
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Channel"))
        controls.addWidget(self.norm)
        controls.addWidget(self.scale)
        controls.addWidget(self.status, 1)
        controls.addWidget(self.save_png_button)
        controls.addWidget(self.save_csv_button)
        self.zeros = HeatmapView("zeros (%)", SPARSITY_MAP)
        self.zeros.set_describer(self._describe_zeros)
        self.norms = HeatmapView("channel norm", pg.colormap.get("viridis"))
        self.norms.set_describer(self._describe_norm)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.zeros)
        self.splitter.addWidget(self.norms)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 4)
        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.splitter, 1)
        self.norm.currentIndexChanged.connect(self.refresh)
        self.scale.currentIndexChanged.connect(self._show)
        self.save_png_button.clicked.connect(self._ask_save_png)
        self.save_csv_button.clicked.connect(self._ask_save_csv)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        session.model_changed.connect(self.refresh)
        self._update_buttons()

    def refresh(self, *_args: object) -> None:
        """Recompute the norms of the session's model in the background."""
        if self.job is not None and not self.job.done:
            self.job.cancel()
        model = self.session.model
        self.layers = []
        if model is None:
            self._show()
            return
        p = NORMS[self.norm.currentText()]

        def work(progress: ProgressFn, cancel: CancelToken) -> list[ChannelNorms]:
            progress(0.0, model.name)
            return channel_norms(model.module, p)

        self.status.setText("Reading weights…")
        self.job = self.runner.start("Channel norms", work)

    def _on_finished(self, job: Job, result: object) -> None:
        if job is self.job:
            self.layers = list(result)  # type: ignore[call-overload]
            self._show()

    def _on_failed(self, job: Job, message: str) -> None:
        if job is self.job:
            self.status.setText(f"Could not read the weights: {message}")
            self.session.log(f"Channel norms: {message}", ERROR)

    def _show(self, *_args: object) -> None:
        names = [c.layer for c in self.layers]
        relative = self.scale.currentIndex() == 0
        zeros = np.array([[c.sparsity * 100.0] for c in self.layers]).reshape(len(names), 1)
        self.zeros.set_matrix(names, ["zeros"], zeros, levels=(0.0, 100.0), column_title="")
        grid = norm_matrix(self.layers, relative)
        columns = [str(j) for j in range(grid.shape[1])]
        self.norms.bar.setLabel(
            "left", f"{self.norm.currentText()}" + (" (÷ strongest)" if relative else "")
        )
        self.norms.set_matrix(
            names,
            columns,
            grid,
            levels=(0.0, 1.0) if relative else None,
            column_title="output channel",
        )
        if self.layers:
            weak = sum(weak_count(c) for c in self.layers)
            total = sum(len(c.norms) for c in self.layers)
            zeros_total = np.mean([c.sparsity for c in self.layers])
            self.status.setText(
                f"{len(self.layers)} layers, {total:,} channels; {weak:,} weak (below "
                f"{WEAK:.0%} of their layer's strongest); mean sparsity {zeros_total:.1%}"
            )
        elif self.session.model is None:
            self.status.setText("Open a model to see its sparsity and channel norms.")
        self._update_buttons()

    def _describe_zeros(self, row: int, _column: int) -> str:
        c = self.layers[row]
        return f"{c.layer}\n{c.sparsity:.2%} of its weights are exactly zero"

    def _describe_norm(self, row: int, column: int) -> str:
        c = self.layers[row]
        if column >= len(c.norms):
            return f"{c.layer} has {len(c.norms)} output channels"
        top = float(c.norms.max())
        value = float(c.norms[column])
        share = f" ({value / top:.1%} of the strongest)" if top > 0 else ""
        return (
            f"{c.layer} channel {column} of {len(c.norms)}\n"
            f"{self.norm.currentText()} {value:.4g}{share}\n"
            f"{weak_count(c)} weak channels in this layer"
        )

    def csv(self) -> str:
        """One line per (layer, channel): layer, channel, norm, relative norm, layer sparsity."""
        lines = []
        for c in self.layers:
            top = float(c.norms.max()) if c.norms.size else 0.0
            for j, value in enumerate(c.norms):
                rel = float(value) / top if top > 0 else 0.0
                lines.append([c.layer, j, repr(float(value)), repr(rel), repr(c.sparsity)])
        return charts.csv_text(["layer", "channel", "norm", "relative_norm", "sparsity"], lines)

    def save_png(self, path: str | Path) -> Path:
        return charts.save_png(self.splitter, path, self.session.input_files())

    def save_csv(self, path: str | Path) -> Path:
        if not self.layers:
            raise StudioError("there are no channel norms to save yet")
        return write_atomic(path, self.csv(), self.session.input_files())

    def _update_buttons(self) -> None:
        for button in (self.save_png_button, self.save_csv_button):
            button.setEnabled(bool(self.layers))

    def _ask_save_png(self) -> None:
        self._ask(self.save_png, "Save sparsity heatmaps", "-sparsity.png", charts.PNG_FILTER)

    def _ask_save_csv(self) -> None:
        self._ask(self.save_csv, "Save channel norms", "-channel-norms.csv", charts.CSV_FILTER)

    def _ask(self, save: Callable[[str], Path], title: str, suffix: str, filt: str) -> None:
        name = self.session.model.name if self.session.model else "model"
        message = charts.save_with_dialog(
            self, title, name.split()[0] + suffix, filt, save, self.session
        )
        if message:
            self.error.emit("Could not save", message)
