"""The Sensitivity tab for a transformer from a Hugging Face folder: the head/MLP/layer scan
(studio.core.scan.heads) run on the job runner, filling a heatmap layer by layer.

"Heads" shows layers x head groups (the drop with one group alone switched off), "MLP" shows
layers x the fraction of MLP neurons switched off; bars beside the rows show the drop with the
whole layer skipped. Drops are in the units people read: perplexity increase for a causal LM,
cosine lost for an encoder. The scan measures on the calibration split of text data, so the
validation split stays unseen; it is cached on disk per model and data by the core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.scan.heads import SCAN_SEQUENCES, HeadScan
from studio.ui import format as fmt
from studio.ui.panels import head_scan_text as text
from studio.ui.panels.sensitivity_jobs import head_scan_job
from studio.ui.runner import Job, JobRunner
from studio.ui.session import WARNING, Session
from studio.ui.widgets import charts
from studio.ui.widgets.heatmap import HeatmapView

BAR_STEPS = 1000
REDRAW_MS = 50
TIPS = {
    "view": "Heads: each key/value head group switched off alone\n"
    "MLP: a growing fraction of each layer's MLP neurons switched off, least important first",
    "cache": "Reuse a scan measured before for this model and data",
    "log": "Colours and bars by order of magnitude: one unit (often the first layer) can cost\n"
    "a thousand times what the others do. Hover a cell for its exact value.",
}


class HeadScanView(QWidget):
    """Runs and shows the head/MLP/layer scan of the session's transformer."""

    error = Signal(str, str)  # dialog title, one-line message

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.scan: HeadScan | None = None
        self.job: Job | None = None
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
        session.head_scan_changed.connect(self._on_head_scan)

    # --- layout --------------------------------------------------------------------------

    def _build(self) -> None:
        self.start_button = QPushButton("Start scan")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.use_cache = QCheckBox("Use cache")
        self.use_cache.setChecked(True)
        self.use_cache.setToolTip(TIPS["cache"])
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setRange(0, BAR_STEPS)
        self.bar.setMaximumWidth(240)
        self.eta = QLabel()
        run_row = QHBoxLayout()
        for widget in (self.start_button, self.cancel_button, self.use_cache):
            run_row.addWidget(widget)
        run_row.addWidget(self.status, 1)
        run_row.addWidget(self.bar)
        run_row.addWidget(self.eta)

        self.view = QComboBox()
        self.view.addItems(list(text.VIEWS))
        self.view.setToolTip(TIPS["view"])
        self.view.currentTextChanged.connect(lambda _: self.redraw())
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
        self.log_scale = QCheckBox("Log scale")
        self.log_scale.setChecked(True)
        self.log_scale.setToolTip(TIPS["log"])
        self.log_scale.toggled.connect(lambda _: self.redraw())
        self.explain = QLabel()
        self.explain.setEnabled(False)  # drawn grey: a fact, not a control
        self.explain.setWordWrap(True)
        # a long line must not widen the window
        self.explain.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        view_row = QHBoxLayout()
        view_row.addWidget(QLabel("View"))
        view_row.addWidget(self.view)
        view_row.addWidget(self.log_scale)
        view_row.addWidget(self.explain, 1)
        view_row.addWidget(self.save_png_button)
        view_row.addWidget(self.save_csv_button)

        self.heatmap = HeatmapView("perplexity increase")
        layout = QVBoxLayout(self)
        layout.addLayout(run_row)
        layout.addLayout(view_row)
        layout.addWidget(self.heatmap, 1)
        self.update_controls()

    # --- commands ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done

    def ready(self) -> bool:
        s = self.session
        return s.model is not None and s.data is not None and s.inventory is not None

    def start(self) -> Job | None:
        """Scan the session's transformer on its calibration split (its data otherwise)."""
        s = self.session
        if s.model is None or s.data is None or self.running:
            return None
        data = s.calibration if s.calibration is not None else s.data
        try:
            self.scan = text.empty_scan(s.model)
        except StudioError as exc:
            self._fail("Sensitivity scan failed", str(exc))
            return None
        model = s.model.replica()  # the scan hooks its own copy
        self.job = self.runner.start_callbacks(
            "Sensitivity scan", head_scan_job(model, data, self.use_cache.isChecked())
        )
        s.log(f"Head/MLP/layer scan of {model.name} on {data.name}")
        if s.compute.on_ray:
            s.log("The head/MLP/layer scan runs on this machine: it has no Ray path", WARNING)
        self.status.setText("Measuring the unpruned model, then one layer at a time…")
        self.redraw()
        self.update_controls()
        return self.job

    def cancel(self) -> None:
        if self.running and self.job is not None:
            self.job.cancel()
            self.status.setText("Cancelling…")
            self.cancel_button.setEnabled(False)

    def reset(self) -> None:
        """Another model or data: a running scan stops and the heatmap is cleared."""
        if self.running and self.job is not None:
            self.job.cancel()
        self.job = None
        self.scan = None
        self.heatmap.set_matrix([], [], np.zeros((0, 0)))
        self.heatmap.set_side_bars(np.zeros(0), text.LAYER_AXIS)
        self.explain.setText("")
        self.update_controls()

    def save_png(self, path: str | Path) -> Path:
        return charts.save_png(self.heatmap, path, self.session.input_files())

    def save_csv(self, path: str | Path) -> Path:
        """Every measured cell: head groups, MLP ratios and whole layers (as the CLI writes)."""
        if self.scan is None or text.measured_layers(self.scan) == 0:
            raise StudioError("there is no scan to save yet")
        return write_atomic(path, self.scan.to_csv(), self.session.input_files())

    # --- runner events -------------------------------------------------------------------

    def _on_partial(self, job: Job, item: object) -> None:
        if job is not self.job or not isinstance(item, HeadScan):
            return
        self.scan = item
        done = text.measured_layers(item)
        self.status.setText(f"Measured {done} of {len(item.layers)} layers…")
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def _on_progress(self, job: Job, fraction: float, message: str, eta: object) -> None:
        if job is not self.job:
            return
        self.bar.setValue(int(fraction * BAR_STEPS))
        self.eta.setText(f"about {fmt.duration(eta)} left" if eta is not None else "")  # type: ignore[arg-type]

    def _on_finished(self, job: Job, result: object) -> None:
        if job is not self.job or not isinstance(result, HeadScan):
            return
        self.scan = result
        self.session.set_head_scan(result)  # the planner's transformer allocation reads it
        self.redraw()
        self.bar.setValue(BAR_STEPS)
        self.eta.setText("")
        line = text.summary(result, self._scanned_on())
        self.status.setText(line)
        self.session.log(line.replace("Done", "Head/MLP/layer scan done"))
        self.update_controls()

    def _on_failed(self, job: Job, message: str) -> None:
        if job is self.job:
            self.eta.setText("")
            self._fail("Sensitivity scan failed", message, job.traceback)
            self.update_controls()

    def _on_cancelled(self, job: Job) -> None:
        if job is not self.job:
            return
        self.redraw()
        self.eta.setText("")
        done = text.measured_layers(self.scan) if self.scan is not None else 0
        total = len(self.scan.layers) if self.scan is not None else 0
        self.status.setText(f"Cancelled after {done} of {total} layers.")
        self.session.log(f"Head/MLP/layer scan cancelled after {done} of {total} layers", WARNING)
        self.update_controls()

    def _on_head_scan(self, scan: HeadScan | None) -> None:
        """A scan another tab ran (the Planner's sensitivity allocation) is shown here too."""
        if scan is None or scan is self.scan or self.running:
            return
        self.scan = scan
        self.redraw()
        self.status.setText(text.summary(scan, self._scanned_on()))
        self.update_controls()

    def _fail(self, title: str, message: str, trace: str = "") -> None:
        self.status.setText(f"{title}: {message}")
        self.session.log_failure(title, message, trace)
        self.error.emit(title, message)

    # --- view ----------------------------------------------------------------------------

    def redraw(self) -> None:
        """Refresh the heatmap and the layer bars from the scan so far."""
        scan = self.scan
        if scan is None:
            return
        view = self.view.currentText()
        labels, title = text.columns(scan, view)
        self.heatmap.bar.setLabel("left", text.unit(scan))
        values = text.matrix(scan, view)
        self.heatmap.set_log_scale(text.log_width(scan) if self.log_scale.isChecked() else None)
        self.heatmap.set_matrix(
            scan.layers, labels, values, levels=text.levels(values), column_title=title
        )
        self.heatmap.set_describer(lambda row, column: text.cell_text(scan, view, row, column))
        self.heatmap.set_side_bars(
            scan.shown(scan.layer_drop), text.LAYER_AXIS, lambda row: text.layer_text(scan, row)
        )
        unit = text.unit(scan)
        self.explain.setText(
            f"Colour: {unit} with that unit alone switched off; bars: {unit} with the whole "
            "layer skipped. Hover for exact values."
        )

    def update_controls(self) -> None:
        self.start_button.setEnabled(self.ready() and not self.running)
        self.cancel_button.setEnabled(self.running)
        self.use_cache.setEnabled(not self.running)
        self.bar.setVisible(self.running)
        has_rows = self.scan is not None and text.measured_layers(self.scan) > 0
        self.saving.set_enabled(has_rows)
        if self.running:
            return
        s = self.session
        if s.model is None or s.data is None:
            self.status.setText("Open a model and text data to scan its heads and layers.")
        elif self.ready() and self.scan is None:
            data = s.calibration if s.calibration is not None else s.data
            self.status.setText(
                f"Ready to scan {s.model.name} on {data.name} ({len(data):,} sequences; "
                f"the scan measures on up to {SCAN_SEQUENCES})."
            )

    def _scanned_on(self) -> str:
        """What the scan measures on, in words: the calibration text (the model may have
        been trained on it: its perplexity there can be far below the validation one)."""
        s = self.session
        if s.calibration is not None:
            return "the calibration text"
        return s.data.name if s.data is not None else "the data"

    def _suggested(self, suffix: str) -> str:
        name = charts.model_stem(self.session)
        view = self.view.currentText().lower()
        return f"{Path(name).stem}-sensitivity-{view if suffix == '.png' else 'heads'}{suffix}"
