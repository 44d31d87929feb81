"""The Sparsity tab: how sparse each layer already is, and which of its channels are weak.

One heatmap, rows are layers and columns output channels, shows either the norm of every
channel (relative to the layer's strongest by default, so weak channels stand out in layers of
any scale), the fraction of exact zeros in each channel's weights (a pruned or dead channel
is 100 %), or what the channel does on the data: its average percentage of zeros after the
activation (APoZ) or its mean activation (measured in the background when first shown). Each
layer's overall sparsity is in the hover text and the CSV.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.jobs import CancelToken, ProgressFn
from studio.core.models.activations import channel_activation_stats
from studio.core.models.sparsity import ChannelNorms, channel_norms
from studio.ui.runner import Job, JobRunner
from studio.ui.session import ERROR, Session
from studio.ui.widgets import charts
from studio.ui.widgets.heatmap import HeatmapView
from studio.ui.widgets.scan_controls import narrow_combo

WEAK = 0.1  # a channel below this fraction of its layer's strongest is called weak
NORMS = {"L2 norm": 2, "L1 norm": 1}
RELATIVE, ABSOLUTE, ZEROS = "relative norm", "absolute norm", "zeros (%)"
APOZ, ACTIVATION = "APoZ on data (%)", "mean activation on data"
VIEWS = (RELATIVE, ABSOLUTE, ZEROS, APOZ, ACTIVATION)
Activations = dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (apoz, mean activation)
ZEROS_MAP = pg.ColorMap([0.0, 1.0], ["#f7fbff", "#08306b"])
NORM_MAP = pg.colormap.get("viridis")


def channel_matrix(
    layers: list[ChannelNorms], view: str, activations: Activations | None = None
) -> np.ndarray:
    """Layers x channels for one of ``VIEWS`` (padded with NaN to the widest layer); the
    activation views need ``activations`` (layers without them stay NaN)."""
    width = max((len(c.norms) for c in layers), default=0)
    grid = np.full((len(layers), width), np.nan)
    for i, c in enumerate(layers):
        if view in (APOZ, ACTIVATION):
            if activations is not None and c.layer in activations:
                apoz, mean = activations[c.layer]
                values = apoz * 100.0 if view == APOZ else mean / max(float(mean.max()), 1e-12)
                grid[i, : len(values)] = values
            continue
        if view == ZEROS:
            grid[i, : len(c.zeros)] = c.zeros * 100.0
            continue
        norms = c.norms.astype(float)
        top = norms.max() if norms.size else 0.0
        grid[i, : len(norms)] = norms / top if view == RELATIVE and top > 0 else norms
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
        self.activation_job: Job | None = None
        self.activations: Activations | None = None
        self.subject = ""  # which model the heatmap shows
        self.norm = narrow_combo()
        self.norm.addItems(list(NORMS))
        self.norm.setToolTip("How a channel's strength is measured")
        self.view = narrow_combo(12)
        self.view.addItems(list(VIEWS))
        self.view.setToolTip("What the colour shows")
        self.status = QLabel("Open a model to see its sparsity and channel norms.")
        self.status.setWordWrap(True)
        self.saving = charts.SaveButtons(
            self,
            session,
            self.save_png,
            self.save_csv,
            lambda suffix: charts.model_stem(session) + "-channel-norms" + suffix,
            ("Save sparsity heatmap", "Save channel norms"),
            self.error.emit,
        )
        self.save_png_button, self.save_csv_button = self.saving.png, self.saving.csv
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Show"))
        controls.addWidget(self.view)
        controls.addWidget(QLabel("Norm"))
        controls.addWidget(self.norm)
        controls.addWidget(self.status, 1)
        controls.addWidget(self.save_png_button)
        controls.addWidget(self.save_csv_button)
        self.heatmap = HeatmapView(RELATIVE, NORM_MAP)
        self.heatmap.set_describer(self._describe)
        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.heatmap, 1)
        self.norm.currentIndexChanged.connect(self.refresh)
        self.view.currentIndexChanged.connect(self._show)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        session.model_changed.connect(self.refresh)
        session.pruned_changed.connect(self.refresh)
        session.data_changed.connect(self._forget_activations)
        self._update_buttons()

    def refresh(self, *_args: object) -> None:
        """Recompute the norms of the session's model (its pruned copy, once there is one)
        in the background."""
        if self.job is not None and not self.job.done:
            self.job.cancel()
        model, pruned = self.session.model, self.session.pruned
        self.layers = []
        self._forget_activations(show=False)
        if model is None:
            self._show()
            return
        p = NORMS[self.norm.currentText()]
        module = pruned.module if pruned is not None else model.module
        self.subject = "the pruned model" if pruned is not None else model.name

        def work(progress: ProgressFn, cancel: CancelToken) -> list[ChannelNorms]:
            progress(0.0, model.name)
            return channel_norms(module, p)

        self.status.setText("Reading weights…")
        self.job = self.runner.start("Channel norms", work)

    def _forget_activations(self, *_args: object, show: bool = True) -> None:
        if self.activation_job is not None and not self.activation_job.done:
            self.activation_job.cancel()
        self.activation_job, self.activations = None, None
        if show and self.view.currentText() in (APOZ, ACTIVATION):
            self._show()

    def measure_activations(self) -> Job | None:
        """APoZ and mean activation per channel of the shown model on the session's data."""
        model, data = self.session.model, self.session.data
        if model is None or data is None:
            return None
        pruned = self.session.pruned
        module = copy.deepcopy(pruned.module if pruned is not None else model.module)

        def work(progress: ProgressFn, cancel: CancelToken) -> Activations:
            progress(0.0, data.name)
            return channel_activation_stats(module, data, cancel=cancel)

        self.status.setText(f"Measuring activations of {self.subject} on {data.name}…")
        self.activation_job = self.runner.start("Channel activations", work)
        return self.activation_job

    def _on_finished(self, job: Job, result: object) -> None:
        if job is self.job:
            self.layers = list(result)  # type: ignore[call-overload]
            self._show()
        elif job is self.activation_job:
            self.activations = result  # type: ignore[assignment]
            self._show()

    def _on_failed(self, job: Job, message: str) -> None:
        if job is self.job:
            self.status.setText(f"Could not read the weights: {message}")
            self.session.log(f"Channel norms: {message}", ERROR)
        elif job is self.activation_job:
            self.status.setText(f"Could not measure the activations: {message}")
            self.session.log(f"Channel activations: {message}", ERROR)

    def _show(self, *_args: object) -> None:
        names = [c.layer for c in self.layers]
        view = self.view.currentText()
        on_data = view in (APOZ, ACTIVATION)
        grid = channel_matrix(self.layers, view, self.activations)
        label = {
            RELATIVE: f"{self.norm.currentText()} ÷ layer's strongest",
            ABSOLUTE: self.norm.currentText(),
            ZEROS: "zeros in the channel (%)",
            APOZ: "zeros after the activation (%)",
            ACTIVATION: "mean activation ÷ layer's strongest",
        }[view]
        self.heatmap.bar.setColorMap(ZEROS_MAP if view in (ZEROS, APOZ) else NORM_MAP)
        self.heatmap.bar.setLabel("left", label)
        levels = {RELATIVE: (0.0, 1.0), ZEROS: (0.0, 100.0), APOZ: (0.0, 100.0)}.get(view)
        levels = (0.0, 1.0) if view == ACTIVATION else levels
        columns = [str(j) for j in range(grid.shape[1])]
        self.heatmap.set_matrix(names, columns, grid, levels, column_title="output channel")
        if on_data and self.layers and self.activations is None:
            if self.session.data is None:
                self.status.setText("Open data (Data menu) to measure activations on it.")
            elif self.activation_job is None or self.activation_job.done:
                self.measure_activations()
        elif on_data and self.layers and self.activations is not None:
            apoz = np.concatenate([a for a, _ in self.activations.values()])
            idle = int((apoz >= 0.99).sum())
            data = self.session.data.name if self.session.data is not None else "the data"
            self.status.setText(
                f"{self.subject} on {data}: {apoz.size:,} channels, mean APoZ {apoz.mean():.1%}; "
                f"{idle:,} channels are zero after the activation on 99 % or more of the inputs"
            )
        elif self.layers:
            weak = sum(weak_count(c) for c in self.layers)
            dead = sum(c.dead for c in self.layers)
            total = sum(len(c.norms) for c in self.layers)
            sparsity = float(np.mean([c.sparsity for c in self.layers]))
            self.status.setText(
                f"{self.subject}: {len(self.layers)} layers, {total:,} channels: {weak:,} weak "
                f"(below {WEAK:.0%} of their layer's strongest), {dead:,} all zero; "
                f"mean layer sparsity {sparsity:.1%}"
            )
        elif self.session.model is None:
            self.status.setText("Open a model to see its sparsity and channel norms.")
        self._update_buttons()

    def _describe(self, row: int, column: int) -> str:
        c = self.layers[row]
        layer = (
            f"{c.layer}: {c.sparsity:.2%} of its weights are zero, {weak_count(c)} weak channels"
        )
        if column >= len(c.norms):
            return f"{layer}\nit has {len(c.norms)} output channels"
        top = float(c.norms.max())
        value = float(c.norms[column])
        share = f" ({value / top:.1%} of the strongest)" if top > 0 else ""
        text = (
            f"{layer}\nchannel {column} of {len(c.norms)}: {self.norm.currentText()} "
            f"{value:.4g}{share}, {c.zeros[column]:.1%} zeros"
        )
        if self.activations is not None and c.layer in self.activations:
            apoz, mean = self.activations[c.layer]
            text += f"\non the data: APoZ {apoz[column]:.1%}, mean activation {mean[column]:.4g}"
        return text

    def csv(self) -> str:
        """One line per (layer, channel): norm, relative norm, channel zeros, layer sparsity."""
        lines = []
        for c in self.layers:
            top = float(c.norms.max()) if c.norms.size else 0.0
            acts = self.activations.get(c.layer) if self.activations is not None else None
            for j, value in enumerate(c.norms):
                rel = float(value) / top if top > 0 else 0.0
                measured = (
                    [repr(float(acts[0][j])), repr(float(acts[1][j]))]
                    if acts is not None and j < len(acts[0])
                    else ["", ""]
                )
                lines.append(
                    [
                        c.layer,
                        j,
                        repr(float(value)),
                        repr(rel),
                        repr(float(c.zeros[j])),
                        repr(c.sparsity),
                        *measured,
                    ]
                )
        header = [
            "layer",
            "channel",
            "norm",
            "relative_norm",
            "channel_zeros",
            "layer_sparsity",
            "apoz",
            "mean_activation",
        ]
        return charts.csv_text(header, lines)

    def save_png(self, path: str | Path) -> Path:
        return charts.save_png(self.heatmap, path, self.session.input_files())

    def save_csv(self, path: str | Path) -> Path:
        if not self.layers:
            raise StudioError("there are no channel norms to save yet")
        return write_atomic(path, self.csv(), self.session.input_files())

    def _update_buttons(self) -> None:
        self.saving.set_enabled(bool(self.layers))
