"""Horizontal bars of per-layer time, slowest first: measured by a runtime's profiler, or a
device profile's roofline estimate (coloured by what bounds each layer).

The value axis is written in ms or µs, whichever suits the slowest layer (pyqtgraph's own
SI prefix, which appends "(x0.001)" to the label, is off), and the name axis is as wide as
the longest name so that no name is cut off."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QFont, QFontMetricsF, QResizeEvent
from PySide6.QtWidgets import QWidget

from studio.core.latency.types import DeviceEstimate, LayerTime

TOP_LAYERS = 15
COMPUTE, MEMORY = "#1f6feb", "#f08c00"
COMPUTE_BRUSH, MEMORY_BRUSH = pg.mkBrush(COMPUTE), pg.mkBrush(MEMORY)
TITLE_PT = 10
NAME_PAD = 6  # pixels between the longest name and the axis line, beyond pyqtgraph's offset


def time_unit(largest_ms: float) -> tuple[float, str]:
    """The factor from ms and the unit to write times whose largest is ``largest_ms``: ms
    from 1 ms up, µs below (so the axis reads 40 µs, not 0.04 ms)."""
    return (1.0, "ms") if largest_ms >= 1.0 else (1e3, "µs")


class LayerBars(pg.PlotWidget):
    """The slowest ``TOP_LAYERS`` layers as bars, names on the axis."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.invertY(True)
        self.setMenuEnabled(False)
        self.unit = "ms"
        self.full_title = ""
        self.names: list[str] = []
        # room on the right for the last value under the axis (it is centred on its tick)
        self.plotItem.layout.setContentsMargins(2, 2, 14, 2)
        self.tick_font = QFont(self.font())
        self.tick_font.setPointSizeF(max(7.0, self.tick_font.pointSizeF() - 1))
        for side in ("left", "bottom"):
            self.getAxis(side).setStyle(tickFont=self.tick_font)
        self.getAxis("bottom").enableAutoSIPrefix(False)
        self.setLabel("bottom", "ms per inference")
        self.show_hint("Per-layer time: select a variant, then Per-layer profile")

    def show_hint(self, text: str) -> None:
        self.clear()
        self.names = []
        self.getAxis("left").setTicks([[]])
        self._set_title(text)

    def show_measured(self, variant: str, layers: Sequence[LayerTime]) -> None:
        shown = list(layers)[:TOP_LAYERS]
        labels = [f"{layer.name} ({layer.op})" for layer in shown]
        self._bars(labels, [layer.ms for layer in shown], [COMPUTE_BRUSH] * len(shown))
        self._set_title(f"Measured per-layer time of {variant}")

    def show_estimate(self, variant: str, estimate: DeviceEstimate) -> None:
        shown = sorted(estimate.layers, key=lambda layer: -layer.ms)[:TOP_LAYERS]
        brushes = [MEMORY_BRUSH if layer.bound == "memory" else COMPUTE_BRUSH for layer in shown]
        labels = [f"{layer.name} ({layer.bound})" for layer in shown]
        self._bars(labels, [layer.ms for layer in shown], brushes, key=True)
        self._set_title(f"Estimated per-layer time of {variant} on {estimate.device}")

    def _bars(self, labels: list[str], ms: list[float], brushes: list, key: bool = False) -> None:
        self.clear()
        self.names = list(labels)
        if not ms:
            self.getAxis("left").setTicks([[]])
            return
        scale, self.unit = time_unit(max(ms))
        widths = np.asarray(ms, float) * scale
        y = np.arange(len(ms), dtype=float)
        self.addItem(
            pg.BarGraphItem(x0=0, y=y, height=0.7, width=widths, brushes=brushes, pen=None)
        )
        label = f"{self.unit} per inference"
        if key:  # what the colours mean, in the colours
            label += (
                f"&nbsp;&nbsp; <span style='color:{COMPUTE}'>■</span> compute-bound"
                f"&nbsp;&nbsp; <span style='color:{MEMORY}'>■</span> memory-bound"
            )
        self.setLabel("bottom", label)
        left = self.getAxis("left")
        left.setTicks([[(float(i), name) for i, name in enumerate(labels)]])
        left.setWidth(self.names_width())
        self.setXRange(0, float(widths.max()) * 1.05 or 1.0, padding=0)
        self.setYRange(-0.6, len(ms) - 0.4, padding=0)

    def names_width(self) -> int:
        """Pixels the name axis needs to show its longest name whole."""
        if not self.names:
            return 0
        metrics = QFontMetricsF(self.tick_font)
        longest = max(metrics.horizontalAdvance(name) for name in self.names)
        axis = self.getAxis("left")
        offset = axis.style["tickTextOffset"][0] + max(0, axis.style["tickLength"])
        return int(np.ceil(longest + offset + NAME_PAD))

    # ---- title: elided to the width, in full in the tooltip ---------------------------------

    def _set_title(self, text: str) -> None:
        self.full_title = text
        self._fit_title()

    def _fit_title(self) -> None:
        font = QFont(self.font())
        font.setPointSizeF(TITLE_PT)
        # the title sits over the bars' column: the widget less the name axis and margins
        room = max(60.0, self.width() - self.getAxis("left").maximumWidth() - 30.0)
        shown = QFontMetricsF(font).elidedText(self.full_title, Qt.TextElideMode.ElideRight, room)
        self.setTitle(shown, size=f"{TITLE_PT}pt")
        # a title wider than its column would widen the plot past the widget (cutting off the
        # names on the left and the values on the right): let it be clipped instead
        self.plotItem.titleLabel.setMinimumWidth(0)
        self.setToolTip(self.full_title if shown != self.full_title else "")

    def resizeEvent(self, event: QResizeEvent | None) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        if getattr(self, "full_title", ""):  # pyqtgraph resizes during __init__, before it is set
            self._fit_title()
