"""Live training charts: loss, validation quality, learning rate and sparsity against step.

Records arrive from the training job many times a second; they are appended to preallocated
numpy buffers (:class:`Series`) and the curves are redrawn from those buffers by a timer on
the GUI thread, at most every ``REDRAW_MS`` and only when something new arrived.

Validation quality is accuracy or agreement (in %) for classifiers, perplexity (lower is
better) for a causal language model and cosine to the original for a text encoder, as the
epoch records carry them.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QWidget

from studio.core.train.types import TrainRecord

REDRAW_MS = 100
BLUE, ORANGE, GREEN, GREY = "#1f6feb", "#d9480f", "#2f9e44", "#868e96"
# metric -> (chart title, axis label, factor from the record's value to the plotted one)
QUALITY = {
    "accuracy": ("Validation accuracy", "accuracy (%)", 100.0),
    "agreement": ("Agreement with the original", "agreement (%)", 100.0),
    "perplexity": ("Validation perplexity (lower is better)", "perplexity", 1.0),
    "cosine": ("Cosine to the original (validation)", "cosine", 1.0),
}


class Series:
    """Growable (x, y) buffers: amortised O(1) appends, views of the filled part."""

    def __init__(self, capacity: int = 512) -> None:
        self._x = np.empty(max(16, capacity))
        self._y = np.empty(max(16, capacity))
        self.size = 0

    def append(self, x: float, y: float) -> None:
        if self.size == len(self._x):
            self._x = np.resize(self._x, 2 * self.size)
            self._y = np.resize(self._y, 2 * self.size)
        self._x[self.size], self._y[self.size] = x, y
        self.size += 1

    def clear(self) -> None:
        self.size = 0

    @property
    def x(self) -> np.ndarray:
        return self._x[: self.size]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self.size]


class TrainingCharts(pg.GraphicsLayoutWidget):
    """Four plots sharing the step axis, fed by :meth:`add` and redrawn on a timer."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(320)
        self.loss_plot = self._plot(0, 0, "Training loss", "loss")
        self.quality_plot = self._plot(0, 1, "Validation accuracy", "accuracy (%)")
        self.lr_plot = self._plot(1, 0, "Learning rate", "lr")
        self.sparsity_plot = self._plot(1, 1, "Sparsity of the weights", "zeros (%)")
        for plot in (self.quality_plot, self.lr_plot, self.sparsity_plot):
            plot.setXLink(self.loss_plot)
        self.quality_plot.addLegend(offset=(-10, -10))
        self.series = {name: Series() for name in ("loss", "quality", "lr", "sparsity")}
        self.loss_curve = self.loss_plot.plot(pen=pg.mkPen(BLUE, width=1.5))
        self.quality_curve = self.quality_plot.plot(
            pen=pg.mkPen(BLUE, width=2), symbol="o", symbolSize=6, symbolBrush=BLUE, name="model"
        )
        self.lr_curve = self.lr_plot.plot(pen=pg.mkPen(GREEN, width=1.5))
        self.sparsity_curve = self.sparsity_plot.plot(pen=pg.mkPen(ORANGE, width=1.5))
        self.sparsity_plot.setYRange(0, 100, padding=0.02)
        self.sparsity_plot.enableAutoRange(axis="y", enable=False)
        for curve in (self.loss_curve, self.lr_curve, self.sparsity_curve):
            curve.setDownsampling(auto=True, method="peak")
            curve.setClipToView(True)
        self.reference_line = pg.InfiniteLine(
            angle=0,
            pen=pg.mkPen(GREY, width=1.5, style=Qt.PenStyle.DashLine),
            movable=False,
            label="unpruned {value:.2f} %",  # set for the metric by reset()
            labelOpts={"position": 0.15, "color": GREY, "anchors": [(0, 1), (0, 1)]},
        )
        self.reference_line.setVisible(False)
        self.quality_plot.addItem(self.reference_line)
        self.best_marker = pg.ScatterPlotItem(
            size=16, symbol="star", brush=pg.mkBrush(ORANGE), pen=pg.mkPen("#7f2704"), name="best"
        )
        self.quality_plot.addItem(self.best_marker)
        self.best_line = pg.InfiniteLine(angle=90, pen=pg.mkPen(ORANGE, width=1), movable=False)
        self.best_line.setVisible(False)
        self.quality_plot.addItem(self.best_line)
        self.best: tuple[float, float, float] | None = None  # (step, value, epoch)
        self.quality_metric = "accuracy"
        self._dirty = False
        self.timer = QTimer(self)
        self.timer.setInterval(REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    def _plot(self, row: int, col: int, title: str, label: str) -> pg.PlotItem:
        plot = self.addPlot(row=row, col=col, title=title)
        plot.showGrid(x=True, y=True, alpha=0.25)
        plot.setLabel("bottom", "step")
        plot.setLabel("left", label)
        plot.setMenuEnabled(False)
        return plot

    # ---- feeding ------------------------------------------------------------------------

    def reset(self, metric: str = "accuracy", reference: float | None = None) -> None:
        """Empty every chart; ``metric`` is accuracy, agreement (fractions, shown in %),
        perplexity or cosine, ``reference`` the unpruned model's value of it (a dashed line)."""
        for series in self.series.values():
            series.clear()
        self.quality_metric = metric
        title, label, factor = QUALITY[metric]
        self.quality_plot.setTitle(title)
        self.quality_plot.setLabel("left", label)
        self.reference_line.label.setFormat(
            "unpruned {value:.2f} %" if factor == 100.0 else "unpruned {value:.4g}"
        )
        # the unpruned model is near the top for accuracy and the bottom for perplexity: its
        # label goes on the side of the line that stays in view, the legend where the curve
        # is not (it rises for accuracy, falls for perplexity)
        lower_better = metric == "perplexity"
        anchor = (0, 0) if lower_better else (0, 1)
        self.reference_line.label.anchors = [anchor, anchor]
        self.reference_line.label.updatePosition()
        self.quality_plot.legend.setOffset((-10, 10) if lower_better else (-10, -10))
        self.set_reference(reference)
        self.best = None
        self.best_marker.setData([], [])
        self.best_line.setVisible(False)
        self._dirty = True

    @property
    def _factor(self) -> float:
        return QUALITY[self.quality_metric][2]

    def set_reference(self, value: float | None) -> None:
        self.reference_line.setVisible(value is not None)
        if value is not None:
            self.reference_line.setValue(self._factor * value)

    def add_start(self, value: float | None) -> None:
        """The pruned model's quality before training, at step 0."""
        if value is not None:
            self.series["quality"].append(0, self._factor * value)
            self._dirty = True

    def add(self, record: TrainRecord) -> None:
        if record.kind == "step":
            self.series["loss"].append(record.step, record.loss)
        else:
            field = "val_accuracy" if self.quality_metric == "accuracy" else self.quality_metric
            value = getattr(record, field)
            if value is not None:
                self.series["quality"].append(record.step, self._factor * value)
                if record.is_best:
                    self.best = (record.step, self._factor * value, record.epoch)
        self.series["lr"].append(record.step, record.lr)
        self.series["sparsity"].append(record.step, 100 * record.sparsity)
        self._dirty = True

    def redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        s = self.series
        self.loss_curve.setData(s["loss"].x, s["loss"].y)
        self.quality_curve.setData(s["quality"].x, s["quality"].y)
        self.lr_curve.setData(s["lr"].x, s["lr"].y)
        self.sparsity_curve.setData(s["sparsity"].x, s["sparsity"].y)
        if self.best is not None:
            step, value, _ = self.best
            self.best_marker.setData([step], [value])
            self.best_line.setValue(step)
            self.best_line.setVisible(True)
        else:
            self.best_marker.setData([], [])
            self.best_line.setVisible(False)
