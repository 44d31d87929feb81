"""The Sensitivity tab: scan settings, a live heatmap, and the selected layer's curve.

The scan runs as a stream job on the runner; each finished (target, ratio) row arrives as a
``partial`` item and the heatmap is redrawn at most every ``REDRAW_MS``. Rows are cached on
disk by the core as they finish, so a cancelled scan resumes where it stopped.

A transformer from a Hugging Face folder gets its own view instead (head_scan_view): layers x
head groups or MLP ratios, and whole layers; the panel shows one view or the other by the
session's model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSplitter,
    QStackedLayout,
    QVBoxLayout,
    QWidget,
)

from studio.core.cluster.connection import ClusterInfo, Compute
from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.jobs import CancelToken, ProgressFn
from studio.core.models.loaded import HUGGINGFACE
from studio.core.scan.types import ScanReport, ScanRow
from studio.ui import format as fmt
from studio.ui.panels import scan_text
from studio.ui.panels.head_scan_view import HeadScanView
from studio.ui.panels.sensitivity_jobs import scan_stream
from studio.ui.runner import Job, JobRunner
from studio.ui.session import WARNING, Session
from studio.ui.widgets import charts
from studio.ui.widgets.heatmap import HeatmapView
from studio.ui.widgets.scan_controls import ScanControls, ratios_text

REDRAW_MS = 50
CURVE_HINT = "Click a row to see its curve"
BAR_STEPS = 1000
SORTS = ("Model order", "Most sensitive first", "Least sensitive first")
CURVE_PEN = pg.mkPen("#c0392b", width=2)
MEAN_PEN = pg.mkPen("#999999", width=1, style=Qt.PenStyle.DashLine)


class SensitivityPanel(QWidget):
    """Runs sensitivity scans of the session's model on its data and shows them live."""

    error = Signal(str, str)  # dialog title, one-line message

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.report: ScanReport | None = None
        self.job: Job | None = None
        self._start_when_ready = False
        self._preferred_metric = "accuracy"  # what the user last chose, when the data allows
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(REDRAW_MS)
        self._redraw_timer.timeout.connect(self.redraw)
        self._build()
        runner.partial.connect(self._on_partial)
        runner.progress.connect(self._on_progress)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)
        session.model_changed.connect(self._on_inputs_changed)
        session.data_changed.connect(self._on_inputs_changed)
        session.inventory_changed.connect(self._on_session_changed)
        session.compute_changed.connect(self._on_compute_changed)
        self._on_compute_changed(session.compute)
        self._on_session_changed()

    # --- layout --------------------------------------------------------------------------

    def _build(self) -> None:
        self.controls = ScanControls()
        self.start_button = QPushButton("Start scan")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, BAR_STEPS)
        self.bar.setMaximumWidth(240)
        self.eta = QLabel()
        run_row = QHBoxLayout()
        for widget in (self.start_button, self.cancel_button):
            run_row.addWidget(widget)
        run_row.addWidget(self.status, 1)
        run_row.addWidget(self.bar)
        run_row.addWidget(self.eta)

        self.sort = QComboBox()
        self.sort.addItems(SORTS)
        self.sort.setToolTip("Sensitivity is the mean drop over the measured ratios")
        self.saving = charts.SaveButtons(
            self,
            self.session,
            self.save_png,
            self.save_csv,
            self._suggested,
            ("Save heatmap", "Save scan data"),
            self.error.emit,
        )
        self.save_png_button, self.save_csv_button = self.saving.png, self.saving.csv
        view_row = QHBoxLayout()
        view_row.addWidget(QLabel("Rows"))
        view_row.addWidget(self.sort)
        view_row.addStretch(1)
        self.where = QLabel()  # where the scan runs: this machine or Ray
        self.where.setEnabled(False)  # drawn grey: a fact, not a control
        view_row.addWidget(self.where)
        view_row.addWidget(self.save_png_button)
        view_row.addWidget(self.save_csv_button)

        self.heatmap = HeatmapView(scan_text.DROP_LABEL["accuracy"])
        self.heatmap.set_describer(self._describe)
        self.heatmap.row_clicked.connect(self.show_curve)
        self.curve_plot = pg.PlotWidget()
        self.curve_plot.setLabel("bottom", "ratio")
        for axis in ("bottom", "left"):
            self.curve_plot.getAxis(axis).enableAutoSIPrefix(False)
        self.curve_plot.setXRange(0.0, 1.0, padding=0.02)
        self.curve_plot.showGrid(x=True, y=True, alpha=0.25)
        self.curve_plot.addLegend(offset=(10, 10))
        self.curve_plot.setTitle(CURVE_HINT)
        self.curve = self.curve_plot.plot(
            [], [], pen=CURVE_PEN, symbol="o", symbolSize=7, symbolBrush="#c0392b", name="selected"
        )
        self.mean_curve = self.curve_plot.plot([], [], pen=MEAN_PEN, name="mean of all rows")
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self.heatmap)
        splitter.addWidget(self.curve_plot)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)

        self.cnn_view = QWidget()
        layout = QVBoxLayout(self.cnn_view)
        layout.addWidget(self.controls)
        layout.addLayout(run_row)
        layout.addLayout(view_row)
        layout.addWidget(splitter, 1)
        self.transformer = HeadScanView(self.session, self.runner)
        self.transformer.error.connect(self.error)
        self.stack = QStackedLayout(self)
        self.stack.setContentsMargins(0, 0, 0, 0)
        self.stack.addWidget(self.cnn_view)
        self.stack.addWidget(self.transformer)
        self.controls.metric_changed.connect(self._on_view_changed)
        self.sort.currentIndexChanged.connect(self._on_view_changed)

    # --- commands ------------------------------------------------------------------------

    def start_when_ready(self) -> None:
        """Start a scan as soon as a model, its inventory and data are in (used at launch)."""
        self._start_when_ready = True
        self._on_session_changed()

    @property
    def is_transformer(self) -> bool:
        """The session's model is a transformer from a Hugging Face folder."""
        model = self.session.model
        return model is not None and model.kind == HUGGINGFACE

    def start(self) -> Job | None:
        """Start (or resume, from the cache) a scan with the current settings; for a
        transformer, its head/MLP/layer scan."""
        if self.is_transformer:
            return self.transformer.start()
        model, data = self.session.model, self.session.data
        if model is None or data is None or self.running:
            return None
        try:
            settings = self.controls.settings()
        except StudioError as exc:
            self._fail("Bad scan settings", str(exc))
            return None
        use_cache = self.controls.use_cache.isChecked()
        compute = self.session.compute
        model = model.replica()  # the scan traces and hooks its own copy (made here, not
        # in the worker, so that no other job's hooks are copied with it)

        def work(progress: ProgressFn, cancel: CancelToken) -> Iterator[Any]:
            return scan_stream(model, data, settings, use_cache, compute, progress, cancel)

        self.report = None
        self.heatmap.set_matrix([], [], np.zeros((0, 0)))
        on_ray = compute.on_ray and settings.method != "taylor"  # the connection is here
        self.job = self.runner.start_stream("Sensitivity scan", work, isolate=not on_ray)
        self.session.log(
            f"Sensitivity scan of {model.name} on {data.name}: {settings.mode}, "
            f"{settings.method}, ratios {ratios_text(settings.ratios)}"
        )
        self.status.setText("Preparing: finding the dependency groups and the baseline…")
        self._update_controls()
        return self.job

    def cancel(self) -> None:
        if self.running and self.job is not None:
            self.job.cancel()
            self.status.setText("Cancelling…")
            self.cancel_button.setEnabled(False)

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done

    def save_png(self, path: str | Path) -> Path:
        return charts.save_png(self.heatmap, path, self.session.input_files())

    def save_csv(self, path: str | Path) -> Path:
        """The scan's rows (layer, ratio, metric, value, baseline, drop), as the CLI writes."""
        if self.report is None:
            raise StudioError("there is no scan to save yet")
        return write_atomic(
            path, self.report.to_csv(self.controls.metric_key), self.session.input_files()
        )

    # --- runner events -------------------------------------------------------------------

    def _on_compute_changed(self, compute: Compute) -> None:
        if not self.running:
            self.where.setText(f"Runs on {compute.describe()}")

    def _on_partial(self, job: Job, item: object) -> None:
        if job is not self.job:
            return
        if isinstance(item, ClusterInfo):
            self.where.setText(f"Runs on {item.where()}")
            self.session.log(f"Sensitivity scan runs on {item.where()}")
        elif isinstance(item, ScanReport):
            self.report = item
            self.controls.allow_metrics(method=item.settings.method)
            self.status.setText(scan_text.scan_summary(item))
            self.redraw()
        elif isinstance(item, ScanRow) and self.report is not None:
            self.report.rows.append(item)
            if not self._redraw_timer.isActive():
                self._redraw_timer.start()

    def _on_progress(self, job: Job, fraction: float, message: str, eta: object) -> None:
        if job is not self.job:
            return
        self.bar.setValue(int(fraction * BAR_STEPS))
        self.eta.setText(f"about {fmt.duration(eta)} left" if eta is not None else "")  # type: ignore[arg-type]

    def _on_finished(self, job: Job, seconds: object) -> None:
        if job is not self.job or self.report is None:
            return
        self.session.set_scan(self.report)  # the planner reads its curves
        self.redraw()
        if self.heatmap.selected < 0 and self.report.targets:  # show the worst curve first
            names, _, grid = scan_text.display_matrix(self.report, self.controls.metric_key)
            self.heatmap.select_row(scan_text.sensitivity_order(grid)[0])
            self.show_curve(self.heatmap.selected)
        self.bar.setValue(BAR_STEPS)
        self.eta.setText("")
        errors = sum(1 for r in self.report.rows if r.error)
        measured = len(self.report.rows) - self.report.cached_rows
        cached = self.report.cached_rows
        took = fmt.duration(float(seconds or 0))
        done = f"{measured} measured in {took}" + (f", {cached} from the cache" if cached else "")
        if not measured:
            done = "all from the cache"
        base = self.report.baseline
        quality = f"accuracy {base.accuracy:.2%}, " if base.accuracy is not None else ""
        text = (
            f"Done: {len(self.report.rows)} cells, {done}; baseline {quality}loss {base.loss:.4f}"
        )
        if errors:
            text += f"; {errors} cells could not be measured (hover them for why)"
        self.status.setText(text)
        self.session.log(text.replace("Done", "Sensitivity scan done"))
        self._update_controls()

    def _on_failed(self, job: Job, message: str) -> None:
        if job is self.job:
            self.eta.setText("")
            self._fail("Sensitivity scan failed", message, job.traceback)
            self._update_controls()

    def _on_cancelled(self, job: Job) -> None:
        if job is not self.job:
            return
        self.redraw()
        self.eta.setText("")
        done = len(self.report.rows) if self.report is not None else 0
        total = len(self.report.targets) * len(self.report.settings.ratios) if self.report else 0
        resume = (
            " They are cached: Resume goes on from there."
            if self.controls.use_cache.isChecked()
            else ""
        )
        self.status.setText(f"Cancelled after {done} of {total} cells.{resume}")
        self.session.log(f"Sensitivity scan cancelled after {done} of {total} cells", WARNING)
        self._update_controls()

    def _fail(self, title: str, message: str, trace: str = "") -> None:
        self.status.setText(f"{title}: {message}")
        self.session.log_failure(title, message, trace)
        self.error.emit(title, message)

    # --- view ----------------------------------------------------------------------------

    def redraw(self) -> None:
        """Refresh the heatmap (and the curve) from the rows received so far."""
        if self.report is None:
            return
        metric = self.controls.metric_key
        names, ratios, grid = scan_text.display_matrix(self.report, metric)
        self.heatmap.bar.setLabel("left", scan_text.DROP_LABEL[metric])
        self.heatmap.set_matrix(names, [f"{r:g}" for r in ratios], grid)
        if self.sort.currentIndex() > 0:
            self.heatmap.set_order(scan_text.sensitivity_order(grid, self.sort.currentIndex() == 1))
        self.show_curve(self.heatmap.selected)

    def show_curve(self, row: int) -> None:
        """Plot one target's change against the ratio, beside the mean of all targets."""
        if self.report is None:
            self.curve.setData([], [])
            self.mean_curve.setData([], [])
            self.curve_plot.setTitle(CURVE_HINT)
            return
        metric = self.controls.metric_key
        names, ratios, grid = scan_text.display_matrix(self.report, metric)
        self.curve_plot.setLabel("left", scan_text.DROP_LABEL[metric])
        measured = np.isfinite(grid)
        sums = np.where(measured, grid, 0.0).sum(axis=0)
        counts = measured.sum(axis=0)
        mean = np.divide(sums, counts, out=np.full(len(ratios), np.nan), where=counts > 0)
        keep = np.isfinite(mean)
        self.mean_curve.setData(np.array(ratios)[keep], mean[keep])
        if not 0 <= row < len(names):
            self.curve.setData([], [])
            self.curve_plot.setTitle(CURVE_HINT)
            return
        keep = np.isfinite(grid[row])
        self.curve.setData(np.array(ratios)[keep], grid[row][keep])
        self.curve_plot.setTitle(names[row])

    def _describe(self, row: int, column: int) -> str:
        assert self.report is not None
        target = self.report.targets[row]
        ratio = sorted(set(self.report.settings.ratios))[column]
        found = next(
            (r for r in self.report.rows if r.layer == target.name and r.ratio == ratio), None
        )
        return scan_text.cell_text(self.report, self.controls.metric_key, target, found, ratio)

    def _on_view_changed(self, *_args: object) -> None:
        self.redraw()

    def _on_inputs_changed(self, *_args: object) -> None:
        """Another model or data: a scan of the old ones is stopped and cleared."""
        if self.running and self.job is not None:
            self.job.cancel()
        self.job = None
        self.report = None
        self.heatmap.set_matrix([], [], np.zeros((0, 0)))
        self.show_curve(-1)
        self.controls.release_method()
        self.transformer.reset()
        self.stack.setCurrentWidget(self.transformer if self.is_transformer else self.cnn_view)
        self._on_session_changed()

    def _on_session_changed(self, *_args: object) -> None:
        s = self.session
        ready = s.model is not None and s.data is not None and s.inventory is not None
        if not self.running:
            if s.model is None or s.data is None:
                self.status.setText("Open a model and data to scan its sensitivity.")
            elif ready:
                self.status.setText(
                    f"Ready to scan {s.model.name} on {s.data.name} ({len(s.data):,} samples)."
                )
        self._update_controls()
        self.transformer.update_controls()
        if ready and self._start_when_ready and not self.running and not self.transformer.running:
            self._start_when_ready = False
            self.start()

    def _update_controls(self, *_args: object) -> None:
        s = self.session
        ready = s.model is not None and s.data is not None and s.inventory is not None
        self.controls.allow_metrics(labelled=s.data is None or s.data.labelled)
        resumable = (
            self.job is not None
            and self.job.state == "cancelled"
            and self.controls.use_cache.isChecked()
        )
        self.start_button.setText("Resume scan" if resumable else "Start scan")
        self.start_button.setEnabled(ready and not self.running)
        self.cancel_button.setEnabled(self.running)
        self.controls.set_running(self.running)
        has_rows = self.report is not None and bool(self.report.rows)
        self.saving.set_enabled(has_rows)
        self.bar.setVisible(self.running)

    # --- saving --------------------------------------------------------------------------

    def _suggested(self, suffix: str) -> str:
        name = self.session.model.name if self.session.model else "scan"
        mode = self.report.settings.mode if self.report else "scan"
        return f"{Path(name).stem}-sensitivity-{mode}{suffix}"
