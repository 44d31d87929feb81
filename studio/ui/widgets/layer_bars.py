"""Horizontal bars of per-layer time, slowest first: measured by a runtime's profiler, or a
device profile's roofline estimate (coloured by what bounds each layer)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QWidget

from studio.core.latency.types import DeviceEstimate, LayerTime

TOP_LAYERS = 15
COMPUTE_BRUSH = pg.mkBrush("#1f6feb")
MEMORY_BRUSH = pg.mkBrush("#f08c00")


class LayerBars(pg.PlotWidget):
    """The slowest ``TOP_LAYERS`` layers as bars, names on the axis."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.invertY(True)
        self.setMenuEnabled(False)
        self.setLabel("bottom", "ms per inference")
        self.show_hint("Per-layer time: select a variant, then Per-layer profile")

    def show_hint(self, text: str) -> None:
        self.clear()
        self.setTitle(text)

    def show_measured(self, variant: str, layers: Sequence[LayerTime]) -> None:
        shown = list(layers)[:TOP_LAYERS]
        labels = [f"{layer.name} ({layer.op})" for layer in shown]
        self._bars(labels, [layer.ms for layer in shown], [COMPUTE_BRUSH] * len(shown))
        self.setTitle(f"Per-layer time of {variant} (measured, slowest first)")

    def show_estimate(self, variant: str, estimate: DeviceEstimate) -> None:
        shown = sorted(estimate.layers, key=lambda layer: -layer.ms)[:TOP_LAYERS]
        brushes = [MEMORY_BRUSH if layer.bound == "memory" else COMPUTE_BRUSH for layer in shown]
        labels = [f"{layer.name} ({layer.bound})" for layer in shown]
        self._bars(labels, [layer.ms for layer in shown], brushes)
        self.setTitle(
            f"{variant} on {estimate.device} (estimated; blue compute-, orange memory-bound)"
        )

    def _bars(self, labels: list[str], ms: list[float], brushes: list) -> None:
        self.clear()
        if not ms:
            return
        y = np.arange(len(ms), dtype=float)
        widths = np.asarray(ms, float)
        self.addItem(
            pg.BarGraphItem(x0=0, y=y, height=0.7, width=widths, brushes=brushes, pen=None)
        )
        self.getAxis("left").setTicks([[(float(i), label) for i, label in enumerate(labels)]])
        self.setXRange(0, float(widths.max()) * 1.05 or 1.0, padding=0)
        self.setYRange(-0.6, len(ms) - 0.4, padding=0)
