"""A labelled heatmap: rows are layers, columns are ratios (or channels), colour is a value.

Built on ``pg.ImageItem`` with a ``pg.ColorBarItem`` beside it. Cells not measured yet are NaN
and drawn grey. Hovering a cell shows its exact value (the owner supplies the text), clicking a
row selects it, and rows can be shown in any order without changing the data.
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

Describer = Callable[[int, int], str]


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
        self.image.setImage(shown if n and m else np.full((1, 1), np.nan), autoLevels=False)
        self.image.setRect(rect)
        self.bar.setLevels(self.levels())
        left = self.plot.getAxis("left")
        left.setTicks([[(k + 0.5, _short(self.rows[i])) for k, i in enumerate(self.order)]])
        step = max(1, int(np.ceil(m / MAX_COLUMN_LABELS)))
        bottom = [(j + 0.5, c) for j, c in enumerate(self.columns) if j % step == 0]
        self.plot.getAxis("bottom").setTicks([bottom])
        self.plot.setXRange(0, max(m, 1), padding=0)
        self.plot.setYRange(0, max(n, 1), padding=0)
        self._place_highlight()

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

    def _on_mouse_moved(self, scene_pos: QPointF) -> None:
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
        cell = self.cell_at(event.scenePos())  # type: ignore[attr-defined]
        if cell is not None:
            self.select_row(cell[0])
            self.row_clicked.emit(cell[0])

    # --- export --------------------------------------------------------------------------

    def csv(self) -> str:
        """The matrix as shown: one line per row in display order, one column per column."""
        lines = [
            [self.rows[i], *("" if np.isnan(v) else repr(float(v)) for v in self.values[i])]
            for i in self.order
        ]
        return charts.csv_text(["layer", *self.columns], lines)
