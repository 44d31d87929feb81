"""A labelled heatmap: rows are layers, columns are ratios (or channels), colour is a value.

Built on ``pg.ImageItem`` with a ``pg.ColorBarItem`` beside it. Cells not measured yet are NaN
and drawn grey. Hovering a cell shows its exact value (the owner supplies the text), clicking a
row selects it, and rows can be shown in any order without changing the data. Optionally one
more value per row (a transformer's whole-layer drop) is drawn as a bar beside each row, on an
axis of its own, with its own hover text; and colours and bars can follow a symmetric log
scale (``set_log_scale``) when a few cells are orders of magnitude above the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QCursor, QPen
from PySide6.QtWidgets import QGraphicsRectItem, QLabel, QToolTip, QVBoxLayout, QWidget

from studio.ui.widgets import charts

# ColorBrewer YlOrRd: pale for harmless, dark red for the cells that hurt most
HEAT = pg.ColorMap(
    np.linspace(0.0, 1.0, 9),
    [
        "#ffffcc",
        "#ffeda0",
        "#fed976",
        "#feb24c",
        "#fd8d3c",
        "#fc4e2a",
        "#e31a1c",
        "#bd0026",
        "#800026",
    ],
)
MISSING = QColor("#d9d9d9")
SELECTED = QColor("#1f6feb")
MAX_ROW_LABEL = 28  # characters of a layer name shown on the axis (all of it in the tooltip)

MAX_COLUMN_LABELS = 16  # more columns than this are labelled every n-th

SIDE_BRUSH = QColor("#bd0026")
# the side bars sit in the heatmap plot's own grid, in the row of its cells (so bars and rows
# line up exactly) and right of the colour bar (column 5): a gap, then the bars and their axis
SIDE_GAP_COLUMN, SIDE_COLUMN, SIDE_GAP = 6, 7, 24
SIDE_STRETCH = (4, 1)  # widths of the cells and of the side bars
SIDE_MIN_WIDTH = 140  # room for the bars' axis title

Describer = Callable[[int, int], str]
RowDescriber = Callable[[int], str]


def _short(name: str) -> str:
    return name if len(name) <= MAX_ROW_LABEL else "…" + name[-(MAX_ROW_LABEL - 1) :]


class HeatmapView(QWidget):
    """Shows ``values[row, column]``; rows are data indices, shown in ``order``."""

    row_clicked = Signal(int)  # data row
    hovered = Signal(int, int)  # data row and column under the pointer, -1, -1 outside

    def __init__(
        self, value_label: str, colormap: pg.ColorMap = HEAT, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.rows: list[str] = []
        self.columns: list[str] = []
        self.values = np.zeros((0, 0))
        self.order: list[int] = []
        self.selected = -1
        self._describe: Describer | None = None
        self._fixed_levels: tuple[float, float] | None = None
        self._log_width: float | None = None  # symmetric log scale: linear within this of 0
        self.side: pg.ViewBox | None = None  # bars beside the rows, once set_side_bars is called
        self.side_axis: pg.AxisItem | None = None
        self.side_values: np.ndarray | None = None
        self._side_bars: pg.BarGraphItem | None = None
        self._describe_side: RowDescriber | None = None

        self.canvas = pg.GraphicsLayoutWidget()
        self.plot = self.canvas.addPlot()
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.setMenuEnabled(False)
        self.plot.invertY(True)
        self.plot.getAxis("bottom").setLabel("ratio")
        self.background = QGraphicsRectItem()
        self.background.setBrush(QBrush(MISSING))
        self.background.setPen(QPen(Qt.PenStyle.NoPen))
        self.plot.addItem(self.background)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.highlight = QGraphicsRectItem()
        pen = QPen(SELECTED, 0)
        pen.setCosmetic(True)
        pen.setWidth(3)
        self.highlight.setPen(pen)
        self.highlight.setVisible(False)
        self.plot.addItem(self.highlight)
        self.bar = pg.ColorBarItem(
            values=(0.0, 1.0), colorMap=colormap, label=value_label, interactive=False, width=18
        )
        self.bar.setImageItem(self.image, insert_in=self.plot)
        self.caption = QLabel(" ")
        self.caption.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.caption)
        self.canvas.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.canvas.scene().sigMouseClicked.connect(self._on_mouse_clicked)

    # --- data ----------------------------------------------------------------------------

    def set_matrix(
        self,
        rows: Sequence[str],
        columns: Sequence[str],
        values: np.ndarray,
        levels: tuple[float, float] | None = None,
        column_title: str | None = None,
    ) -> None:
        """New data; keeps the row order if the rows are the same, else model order."""
        values = np.asarray(values, dtype=float).reshape(len(rows), len(columns))
        if list(rows) != self.rows:
            self.order = list(range(len(rows)))
            self.selected = -1
        self.rows, self.columns, self.values = list(rows), list(columns), values
        self._fixed_levels = levels
        if column_title is not None:
            self.plot.getAxis("bottom").setLabel(column_title)
        self._redraw()

    def set_log_scale(self, linear_width: float | None) -> None:
        """Colours and side bars by order of magnitude: values within ``linear_width`` of
        zero change linearly, larger ones logarithmically (the colour bar and the bars' axis
        are labelled in the values themselves); None: linear, the default. ``values`` and
        the hover text keep the exact numbers."""
        self._log_width = linear_width if linear_width is None else max(linear_width, 1e-12)
        self._redraw()

    def scaled(self, values: np.ndarray) -> np.ndarray:
        """``values`` as drawn: as they are, or on the symmetric log scale."""
        values = np.asarray(values, dtype=float)
        if self._log_width is None:
            return values
        return np.sign(values) * np.log10(1.0 + np.abs(values) / self._log_width)

    def _scale_ticks(
        self, low: float, high: float, most: int = 12, gap: float = 0.08
    ) -> list[tuple[float, str]] | None:
        """Ticks at 0 and the powers of ten (with 2x and 5x when few) between low and high,
        placed on the log scale, at most ``most`` of them (every other power when more) and
        none within ``gap`` (of the axis) of 0; None on a linear scale (pyqtgraph's ticks)."""
        if self._log_width is None:
            return None
        first = int(np.ceil(np.log10(self._log_width)))  # below it the scale is linear
        last = int(np.ceil(np.log10(max(abs(low), abs(high), self._log_width))))
        for steps in ((1,), (1, 2, 5)):
            magnitudes = [m * 10.0**k for k in range(first, last + 1) for m in steps]
            values = [0.0] + [v for v in magnitudes if v <= high] + [-v for v in magnitudes]
            values = sorted(v for v in values if low <= v <= high)
            if len(values) >= 4:
                break
        while len(values) > most:
            zero = [0.0] if 0.0 in values else []
            values = sorted(zero + [v for v in values if v != 0.0][::-2])
        span = float(np.ptp(self.scaled(np.array([low, high])))) or 1.0
        ticks = [(float(self.scaled(np.array(v))), f"{v:g}") for v in values]
        # a label close to 0's would overlap it
        return [(x, t) for x, t in ticks if t == "0" or abs(x) >= gap * span]

    def set_side_bars(
        self,
        values: np.ndarray | None,
        label: str = "",
        describe: RowDescriber | None = None,
    ) -> None:
        """One value per row drawn as a horizontal bar beside it (in the row order, on an
        axis titled ``label``); ``describe(row)`` gives a bar's hover text. None removes them."""
        layout = self.plot.layout
        if values is None:
            if self.side is not None and self.side_axis is not None:
                for item in (self.side, self.side_axis):
                    layout.removeItem(item)
                    self.plot.scene().removeItem(item)
                layout.setColumnFixedWidth(SIDE_GAP_COLUMN, 0)
                layout.setColumnStretchFactor(SIDE_COLUMN, 0)
                self.side = self.side_axis = self._side_bars = self.side_values = None
            return
        if self.side is None:
            self.side = pg.ViewBox(enableMouse=False, enableMenu=False)
            self.side.setMinimumWidth(SIDE_MIN_WIDTH)
            self.side.invertY(True)
            self.side.setYLink(self.plot.vb)
            self.side_axis = pg.AxisItem("bottom", linkView=self.side)
            self.side_axis.enableAutoSIPrefix(False)
            self.side_axis.setGrid(64)
            self._side_bars = pg.BarGraphItem(
                x0=[], y=[], width=[], height=0.7, brush=SIDE_BRUSH, pen=None
            )
            self.side.addItem(self._side_bars)
            self.side.addItem(pg.InfiniteLine(0.0, angle=90, pen=pg.mkPen("#666666", width=1)))
            layout.addItem(self.side, 2, SIDE_COLUMN)
            layout.addItem(self.side_axis, 3, SIDE_COLUMN)
            layout.setColumnFixedWidth(SIDE_GAP_COLUMN, SIDE_GAP)
            layout.setColumnStretchFactor(1, SIDE_STRETCH[0])  # the cells (pyqtgraph's grid)
            layout.setColumnStretchFactor(SIDE_COLUMN, SIDE_STRETCH[1])
        assert self.side_axis is not None
        self.side_axis.setLabel(label)
        self.side_values = np.asarray(values, dtype=float).reshape(len(self.rows))
        self._describe_side = describe
        self._redraw_side()

    def _redraw_side(self) -> None:
        if self.side is None or self._side_bars is None or self.side_values is None:
            return
        shown = self.side_values[self.order] if len(self.order) else self.side_values
        finite = self.scaled(np.nan_to_num(shown, nan=0.0))
        self._side_bars.setOpts(
            x0=np.minimum(finite, 0.0),
            y=np.arange(len(shown)) + 0.5,
            width=np.abs(finite),
            height=0.7,
        )
        measured = shown[np.isfinite(shown)]
        low = min(0.0, float(measured.min())) if measured.size else 0.0
        high = max(0.0, float(measured.max())) if measured.size else 1.0
        high = high if high > low else low + 1.0
        ticks = self._scale_ticks(low, high, most=4, gap=0.2)  # a narrow axis
        assert self.side_axis is not None
        self.side_axis.setTicks(None if ticks is None else [ticks])
        scaled_low, scaled_high = self.scaled(np.array([low, high]))
        self.side.setXRange(float(scaled_low), float(scaled_high), padding=0.05)

    def set_order(self, order: Sequence[int]) -> None:
        """Show data rows in this order (a permutation of ``range(len(rows))``)."""
        if sorted(order) != list(range(len(self.rows))):
            raise ValueError("order must be a permutation of the rows")
        self.order = list(order)
        self._redraw()

    def set_describer(self, describe: Describer) -> None:
        """``describe(row, column)`` gives the hover text of a cell (data indices)."""
        self._describe = describe

    def select_row(self, row: int) -> None:
        self.selected = row if 0 <= row < len(self.rows) else -1
        self._place_highlight()

    def levels(self) -> tuple[float, float]:
        if self._fixed_levels is not None:
            return self._fixed_levels
        finite = self.values[np.isfinite(self.values)]
        if finite.size == 0:
            return (0.0, 1.0)
        low, high = min(0.0, float(finite.min())), float(finite.max())
        return (low, high if high > low else low + 1e-9)

    def _redraw(self) -> None:
        n, m = self.values.shape
        shown = self.values[self.order] if n else self.values
        rect = QRectF(0, 0, max(m, 1), max(n, 1))
        self.background.setRect(rect)
        shown = self.scaled(shown)
        self.image.setImage(shown if n and m else np.full((1, 1), np.nan), autoLevels=False)
        self.image.setRect(rect)
        low, high = self.levels()
        self.bar.setLevels(tuple(float(v) for v in self.scaled(np.array([low, high]))))
        ticks = self._scale_ticks(low, high)
        self.bar.axis.setTicks(None if ticks is None else [ticks])  # the axis with values
        left = self.plot.getAxis("left")
        left.setTicks([[(k + 0.5, _short(self.rows[i])) for k, i in enumerate(self.order)]])
        step = max(1, int(np.ceil(m / MAX_COLUMN_LABELS)))
        bottom = [(j + 0.5, c) for j, c in enumerate(self.columns) if j % step == 0]
        self.plot.getAxis("bottom").setTicks([bottom])
        self.plot.setXRange(0, max(m, 1), padding=0)
        self.plot.setYRange(0, max(n, 1), padding=0)
        self._place_highlight()
        if self.side_values is not None and len(self.side_values) != n:
            self.side_values = np.full(n, np.nan)  # new rows: the owner sets the bars again
        self._redraw_side()

    def _place_highlight(self) -> None:
        if self.selected < 0 or self.selected >= len(self.order):
            self.highlight.setVisible(False)
            return
        k = self.order.index(self.selected)
        self.highlight.setRect(QRectF(0, k, max(len(self.columns), 1), 1))
        self.highlight.setVisible(True)

    # --- pointer -------------------------------------------------------------------------

    def cell_at(self, scene_pos: QPointF) -> tuple[int, int] | None:
        """The (data row, column) under a scene position, or None outside the cells."""
        if not self.plot.sceneBoundingRect().contains(scene_pos):
            return None
        point = self.plot.vb.mapSceneToView(scene_pos)
        k, j = int(np.floor(point.y())), int(np.floor(point.x()))
        if 0 <= k < len(self.order) and 0 <= j < len(self.columns):
            return self.order[k], j
        return None

    def describe(self, row: int, column: int) -> str:
        if self._describe is not None:
            return self._describe(row, column)
        value = self.values[row, column]
        shown = "not measured yet" if np.isnan(value) else f"{value:.6g}"
        return f"{self.rows[row]} @ {self.columns[column]}: {shown}"

    def side_row_at(self, scene_pos: QPointF) -> int | None:
        """The data row of the side bar under a scene position, or None."""
        if self.side is None or not self.side.sceneBoundingRect().contains(scene_pos):
            return None
        k = int(np.floor(self.side.mapSceneToView(scene_pos).y()))
        return self.order[k] if 0 <= k < len(self.order) else None

    def describe_side(self, row: int) -> str:
        if self._describe_side is not None:
            return self._describe_side(row)
        value = self.side_values[row] if self.side_values is not None else np.nan
        return f"{self.rows[row]}: {'not measured yet' if np.isnan(value) else f'{value:.6g}'}"

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
        side_row = self.side_row_at(scene_pos)
        if side_row is not None:
            text = self.describe_side(side_row)
            self.caption.setText(text.replace("\n", " · "))
            if self.isVisible():
                QToolTip.showText(QCursor.pos(), text, self)
            self.hovered.emit(side_row, -1)
            return
        cell = self.cell_at(scene_pos)
        if cell is None:
            self.caption.setText(" ")
            self.hovered.emit(-1, -1)
            return
        text = self.describe(*cell)
        self.caption.setText(text.replace("\n", " · "))
        if self.isVisible():
            QToolTip.showText(QCursor.pos(), text, self)
        self.hovered.emit(*cell)

    def _on_mouse_clicked(self, event: object) -> None:
        pos = event.scenePos()  # type: ignore[attr-defined]
        cell = self.cell_at(pos)
        row = cell[0] if cell is not None else self.side_row_at(pos)
        if row is not None:
            self.select_row(row)
            self.row_clicked.emit(row)

    # --- export --------------------------------------------------------------------------

    def csv(self) -> str:
        """The matrix as shown: one line per row in display order, one column per column."""
        lines = [
            [self.rows[i], *("" if np.isnan(v) else repr(float(v)) for v in self.values[i])]
            for i in self.order
        ]
        return charts.csv_text(["layer", *self.columns], lines)
