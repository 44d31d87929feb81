"""Quality against cost (latency or MACs) for every model variant of the session, with the
Pareto front (the variants no other is both faster and better than) highlighted.

The legend sits in a row of its own under the value axis, so no point or name can lie
beneath it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QSizePolicy, QWidget

FRONT, OTHER = "#d9480f", "#868e96"
MARGIN_PX = 12.0  # pixels between the outermost points and the plot's edges
LEGEND_ROW = 4  # PlotItem's grid: title 0, top axis 1, view 2, bottom axis 3


def pareto_front(costs: Sequence[float], qualities: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (lower cost and higher quality are better), in
    order of increasing cost. A point is dominated when another is no worse in both and
    better in one."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -qualities[i]))
    front, best = [], -np.inf
    for i in order:
        if qualities[i] > best:
            front.append(i)
            best = qualities[i]
    return front


class ParetoChart(pg.PlotWidget):
    """Scatter of (cost, quality) with names; the front drawn as a step line."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(220)
        self.showGrid(x=True, y=True, alpha=0.25)
        self.setMenuEnabled(False)
        for side in ("left", "bottom"):  # the panel gives values in the unit it names
            self.getAxis(side).enableAutoSIPrefix(False)
        self.others = pg.ScatterPlotItem(
            size=9, brush=pg.mkBrush(OTHER), pen=pg.mkPen("w"), name="dominated"
        )
        self.front_points = pg.ScatterPlotItem(
            size=12, brush=pg.mkBrush(FRONT), pen=pg.mkPen("w"), name="Pareto front"
        )
        self.front_line = pg.PlotDataItem(pen=pg.mkPen(FRONT, width=1.5))
        for item in (self.front_line, self.others, self.front_points):
            self.addItem(item)
        self.legend = pg.LegendItem(colCount=2, horSpacing=6, frame=False)
        self.legend.addItem(self.front_points, "Pareto front")
        self.legend.addItem(self.others, "dominated")
        self.legend.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        self.plotItem.layout.addItem(self.legend, LEGEND_ROW, 1, Qt.AlignmentFlag.AlignHCenter)
        self.labels: list[pg.TextItem] = []
        self.front: list[int] = []
        self._x = self._y = np.zeros(0)
        self.plotItem.vb.sigResized.connect(self._fit_view)

    def set_points(
        self, names: Sequence[str], costs: Sequence[float], qualities: Sequence[float],
        cost_label: str, quality_label: str,
    ) -> None:  # fmt: skip
        """Points in percent of quality (fractions given) against ``costs``."""
        for label in self.labels:
            self.removeItem(label)
        self.labels = []
        x = np.asarray(costs, float)
        y = 100 * np.asarray(qualities, float)
        self._x, self._y = x, y
        self.front = pareto_front(list(x), list(y)) if len(x) else []
        rest = [i for i in range(len(x)) if i not in self.front]
        self.front_points.setData(x[self.front], y[self.front])
        self.others.setData(x[rest], y[rest])
        self.front_line.setData(x[self.front], y[self.front], stepMode=None)
        for name, cx, qy in zip(names, x, y):
            label = pg.TextItem(name, color="#333333", anchor=(0, 1))
            label.setPos(float(cx), float(qy))
            self.addItem(label)
            self.labels.append(label)
        self._fit_view()
        self.setLabel("bottom", cost_label)
        self.setLabel("left", quality_label)
        self.setTitle(f"{quality_label.split(' (')[0]} against {cost_label.split(' (')[0]}")

    def _fit_view(self, *_args: object) -> None:
        """Ranges that show every point with its name (above and right of it) inside the
        plot, worked out in pixels of the plot's present size."""
        x, y = self._x, self._y
        if not len(x):
            return
        rect = self.plotItem.vb.boundingRect()
        width, height = max(rect.width(), 1.0), max(rect.height(), 1.0)
        text = [label.textItem.boundingRect() for label in self.labels]
        # the names' room: above the highest point, and right of every point for its name
        top_px = max((r.height() for r in text), default=0.0) + 4.0
        low, high = float(y.min()), float(y.max())
        span = high - low or max(1.0, abs(high) * 0.05)
        free = max(height - top_px - MARGIN_PX, 0.25 * height)
        per_px = span / free
        self.setYRange(low - MARGIN_PX * per_px, high + top_px * per_px, padding=0)
        x_low, x_high = float(x.min()), float(x.max())
        x_span = x_high - x_low or max(abs(x_high) * 0.1, 1e-9)
        start = x_low - MARGIN_PX * x_span / max(width - 2 * MARGIN_PX, 1.0)
        end = x_high + MARGIN_PX * x_span / max(width - 2 * MARGIN_PX, 1.0)
        for cx, r in zip(x, text):
            room = width - r.width() - 4.0  # pixels left of the name's start
            if room > 0.25 * width:
                end = max(end, start + (cx - start) * width / room)
        self.setXRange(start, end, padding=0)
