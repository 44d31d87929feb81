"""Quality against cost (latency or MACs) for every model variant of the session, with the
Pareto front (the variants no other is both faster and better than) highlighted."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QWidget

FRONT, OTHER = "#d9480f", "#868e96"


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
        self.addLegend(offset=(-10, -10))
        self.others = pg.ScatterPlotItem(
            size=9, brush=pg.mkBrush(OTHER), pen=pg.mkPen("w"), name="dominated"
        )
        self.front_points = pg.ScatterPlotItem(
            size=12, brush=pg.mkBrush(FRONT), pen=pg.mkPen("w"), name="Pareto front"
        )
        self.front_line = pg.PlotDataItem(pen=pg.mkPen(FRONT, width=1.5))
        for item in (self.front_line, self.others, self.front_points):
            self.addItem(item)
        self.labels: list[pg.TextItem] = []
        self.front: list[int] = []

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
        if len(x):
            span = float(x.max() - x.min()) or float(abs(x.max())) or 1.0
            self.setXRange(float(x.min()) - 0.08 * span, float(x.max()) + 0.3 * span, padding=0)
            low, high = float(y.min()), float(y.max())
            pad = max(0.5, 0.15 * (high - low))
            self.setYRange(low - pad, high + pad, padding=0)
        self.setLabel("bottom", cost_label)
        self.setLabel("left", quality_label)
        self.setTitle(f"{quality_label.split(' (')[0]} against {cost_label.split(' (')[0]}")
