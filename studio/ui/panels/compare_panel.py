"""The Result tab: the pruned model beside the original — totals, a per-layer table and a
per-layer bar chart of parameters before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from torch import nn

from studio.core.files import write_atomic
from studio.ui import format as fmt
from studio.ui.session import Session
from studio.ui.widgets import charts
from studio.ui.widgets.speed_line import SpeedLine

COLUMNS = ("Layer", "Weight before", "Weight after", "Params before", "Params after", "Kept")
BEFORE_BRUSH, AFTER_BRUSH = pg.mkBrush("#b8c2cc"), pg.mkBrush("#1f6feb")


def layer_table(before: nn.Module, after: nn.Module) -> list[tuple[str, str, str, int, int]]:
    """(layer, weight shape before, after, own parameters before, after) for every layer with
    parameters of the original, in model order (a layer removed by pruning has 0 after)."""
    pruned = dict(after.named_modules())
    rows = []
    for name, mod in before.named_modules():
        own = list(mod.parameters(recurse=False))
        if not own:
            continue
        twin = pruned.get(name)
        after_params = sum(p.numel() for p in twin.parameters(recurse=False)) if twin else 0
        rows.append((name, _shape(mod), _shape(twin), sum(p.numel() for p in own), after_params))
    return rows


def _shape(mod: nn.Module | None) -> str:
    weight = getattr(mod, "weight", None) if mod is not None else None
    if weight is None or not hasattr(weight, "shape"):
        return fmt.DASH if mod is None else ""
    return "×".join(str(d) for d in weight.shape)


def _quality(result: Any) -> str:
    before, after = getattr(result, "quality_before", None), getattr(result, "quality_after", None)
    if before is None or after is None:
        return "quality: open data to measure it"
    if before.accuracy is not None and after.accuracy is not None:
        return (
            f"accuracy {before.accuracy:.2%} → {after.accuracy:.2%} "
            f"({(after.accuracy - before.accuracy) * 100:+.2f} points), "
            f"loss {before.loss:.4f} → {after.loss:.4f}"
        )
    return f"agreement {before.agreement:.2%} → {after.agreement:.2%}"


def _recovered(pruned: Any, tuned: Any) -> str:
    """Original → pruned → fine-tuned quality, on one line."""
    before = getattr(pruned, "quality_before", None)
    if tuned.accuracy_after is not None:
        original = f"{before.accuracy:.2%} → " if before and before.accuracy is not None else ""
        chain = f"{original}{tuned.accuracy_before:.2%} → <b>{tuned.accuracy_after:.2%}</b>"
        what = "accuracy original → pruned → fine-tuned"
    else:
        chain = f"{fmt.percent(tuned.agreement_before, 2)} → "
        chain += f"<b>{fmt.percent(tuned.agreement_after, 2)}</b>"
        what = "agreement pruned → fine-tuned"
    return (
        f"{what}: {chain} ({tuned.epochs_run} epochs in {fmt.duration(tuned.seconds)}, "
        f"best epoch {tuned.best_epoch})"
    )


class ComparePanel(QWidget):
    """Shows ``session.pruned`` against ``session.model``."""

    error = Signal(str, str)

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.rows: list[tuple[str, str, str, int, int]] = []
        self.header = QLabel("Apply a plan in the Planner tab to compare the result here.")
        self.header.setWordWrap(True)
        self.header.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.saving = charts.SaveButtons(
            self,
            session,
            self.save_png,
            self.save_csv,
            lambda suffix: charts.model_stem(session) + "-pruned-layers" + suffix,
            ("Save chart", "Save comparison"),
            self.error.emit,
        )
        self.save_png_button, self.save_csv_button = self.saving.png, self.saving.csv
        top = QHBoxLayout()
        top.addWidget(self.header, 1)
        top.addWidget(self.save_png_button)
        top.addWidget(self.save_csv_button)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.chart = pg.PlotWidget()
        self.chart.setMouseEnabled(x=False, y=False)
        self.chart.invertY(True)
        self.chart.setLabel("bottom", "parameters")
        self.chart.getAxis("bottom").enableAutoSIPrefix(False)
        self.chart.addLegend(offset=(-10, 10))
        self.chart.setTitle("Parameters per layer")
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self.table)
        splitter.addWidget(self.chart)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self.speed = SpeedLine()  # the pruned model against the original (SpeedWatch)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.speed)
        layout.addWidget(splitter, 1)
        session.pruned_changed.connect(self.show_result)
        session.finetuned_changed.connect(lambda _r: self.show_result(session.pruned))
        self.show_result(session.pruned)

    def show_result(self, result: Any) -> None:
        model = self.session.model
        self.chart.clear()
        if result is None or model is None:
            self.rows = []
            self.table.setRowCount(0)
            self.header.setText("Apply a plan in the Planner tab to compare the result here.")
            self._update_buttons()
            return
        self.rows = layer_table(model.module, result.module)
        self._fill_table()
        self._draw_chart()
        skipped = list(getattr(result, "skipped", ()))
        lines = [
            f"<b>{result.plan.method}</b> pruning by {result.plan.criterion}: parameters "
            f"{result.params_before:,} → {result.params_after:,} "
            f"({result.params_after / max(result.params_before, 1):.1%}), MACs "
            f"{fmt.compact(result.macs_before)} → {fmt.compact(result.macs_after)} "
            f"({result.macs_after / max(result.macs_before, 1):.1%})",
            _quality(result),
        ]
        if self.session.finetuned is not None:
            lines.append(_recovered(result, self.session.finetuned))
        size_before, size_after = (
            getattr(result, "size_before", 0),
            getattr(result, "size_after", 0),
        )
        if size_before:
            lines.append(
                f"size {fmt.file_size(size_before)} → {fmt.file_size(size_after)}, sparsity "
                f"{getattr(result, 'sparsity', 0.0):.1%}, compression "
                f"{getattr(result, 'compression', 1.0):.2f}×"
            )
        lines += list(getattr(result, "notes", ()))
        if skipped:
            names = ", ".join(f"{layer} ({reason})" for layer, reason in skipped[:3])
            lines.append(
                f"rolled back {len(skipped)}: {names}" + (" …" if len(skipped) > 3 else "")
            )
        self.header.setText("<br>".join(lines))
        self._update_buttons()

    def _fill_table(self) -> None:
        self.table.setRowCount(len(self.rows))
        for i, (name, shape_before, shape_after, before, after) in enumerate(self.rows):
            kept = f"{after / before:.0%}" if before else fmt.DASH
            values = (name, shape_before, shape_after, f"{before:,}", f"{after:,}", kept)
            for column, text in enumerate(values):
                item = QTableWidgetItem(text)
                if column >= 3:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                if after < before:
                    item.setForeground(Qt.GlobalColor.darkBlue)
                self.table.setItem(i, column, item)

    def _draw_chart(self) -> None:
        shown = [r for r in self.rows if r[1].count("×") >= 1]  # conv and linear weights
        y = np.arange(len(shown), dtype=float)
        before = np.array([r[3] for r in shown], dtype=float)
        after = np.array([r[4] for r in shown], dtype=float)
        self.chart.addItem(
            pg.BarGraphItem(
                x0=0,
                y=y - 0.2,
                height=0.38,
                width=before,
                brush=BEFORE_BRUSH,
                pen=None,
                name="before",
            )
        )
        self.chart.addItem(
            pg.BarGraphItem(
                x0=0, y=y + 0.2, height=0.38, width=after, brush=AFTER_BRUSH, pen=None, name="after"
            )
        )
        step = max(1, len(shown) // 30)
        self.chart.getAxis("left").setTicks(
            [[(float(i), shown[i][0]) for i in range(0, len(shown), step)]]
        )
        self.chart.setYRange(-0.6, len(shown) - 0.4, padding=0)

    def csv(self) -> str:
        return charts.csv_text(
            ["layer", "weight_before", "weight_after", "params_before", "params_after"], self.rows
        )

    def save_png(self, path: str | Path) -> Path:
        return charts.save_png(self.chart, path, self.session.input_files())

    def save_csv(self, path: str | Path) -> Path:
        return write_atomic(path, self.csv(), self.session.input_files())

    def _update_buttons(self) -> None:
        self.saving.set_enabled(bool(self.rows))
