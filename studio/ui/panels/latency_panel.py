"""The Latency tab: measured and predicted latency of every model variant of the session
(the original, each pruned and fine-tuned model), the per-layer breakdown, and quality against
latency (or MACs) with the Pareto front.

Every number says whether it was measured on this machine or estimated. Measuring runs as a
stream job (one variant at a time, each row filled as it finishes); the prediction for this
machine comes from :class:`studio.core.latency.predict.LatencyPredictor`, calibrated once
by micro-benchmarks and cached on disk.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.devices import DeviceProfile
from studio.core.latency.devices_estimate import DeviceEstimator
from studio.core.latency.types import DeviceEstimate
from studio.ui.panels.latency_jobs import measure_variants, profile_variant
from studio.ui.panels.latency_settings import RUNTIMES, LatencySettings
from studio.ui.panels.latency_variants import (
    COLUMNS,
    DEVICE_COLUMNS,
    HEADER_TIPS,
    Variant,
    device_cells,
    finetuned_variant,
    log_line,
    pareto_points,
    pruned_variant,
    quality_of,
    row_tips,
    table_row,
    variants_csv,
)
from studio.ui.runner import Job, JobRunner
from studio.ui.session import WARNING, Session
from studio.ui.widgets import charts
from studio.ui.widgets.layer_bars import LayerBars
from studio.ui.widgets.pareto_chart import ParetoChart


class LatencyPanel(QWidget):
    """Measures, predicts and compares latency of the session's model variants."""

    error = Signal(str, str)

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.variants: list[Variant] = []
        self.job: Job | None = None
        self.profile_job: Job | None = None
        # the variants a job's items name by position (the job works on copies of them)
        self._job_variants: weakref.WeakKeyDictionary[Job, list[Variant]] = (
            weakref.WeakKeyDictionary()
        )
        self._measure_after: str | None = None  # launch option: measure once this arrives
        self._estimator: DeviceEstimator | None = None  # roofline rows of the original model
        self.profiles: list[DeviceProfile] = []
        self._build()
        runner.partial.connect(self._on_partial)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)
        session.model_changed.connect(self._reset)
        session.evaluation_changed.connect(self._on_evaluation)
        session.inventory_changed.connect(self._on_evaluation)
        session.pruned_changed.connect(self._on_pruned)
        session.finetuned_changed.connect(self._on_finetuned)
        self._reset()

    # ---- layout -------------------------------------------------------------------------

    def _build(self) -> None:
        form = LatencySettings(self.session)
        self.form = form
        self.runtime, self.device, self.batch = form.runtime, form.device, form.batch
        self.threads, self.budget, self.target = form.threads, form.budget, form.target
        self.source, self.profiles = form.source, form.profiles
        self.measure_button = QPushButton("Measure")
        self.measure_button.setStyleSheet("font-weight: 600")
        self.measure_button.setToolTip("Time every variant (and estimate it from the lookup table)")
        self.measure_button.clicked.connect(self.measure)
        self.profile_button = QPushButton("Per-layer profile")
        self.profile_button.setToolTip("Where the selected variant spends its time, per layer")
        self.profile_button.clicked.connect(self.profile)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.x_axis = QComboBox()
        self.x_axis.addItems(["quality vs latency", "quality vs MACs"])
        self.x_axis.setToolTip("What the quality chart plots against")
        self.x_axis.currentIndexChanged.connect(self.redraw)
        self.target.currentIndexChanged.connect(self.refresh)
        self.saving = charts.SaveButtons(
            self,
            self.session,
            self.save_png,
            self.save_csv,
            lambda suffix: f"{charts.model_stem(self.session)}-latency{suffix}",
            ("Save latency charts", "Save latency table"),
            lambda title, message: self.error.emit(title, message),
        )
        actions = QHBoxLayout()
        for widget in (self.budget, self.measure_button, self.profile_button, self.cancel_button):
            actions.addWidget(widget)
        actions.addStretch(1)
        chart_bar = QHBoxLayout()
        chart_bar.setContentsMargins(0, 0, 0, 0)
        chart_bar.addStretch(1)
        chart_bar.addWidget(self.x_axis)
        chart_bar.addWidget(self.saving.png)
        chart_bar.addWidget(self.saving.csv)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        for column, name in enumerate(COLUMNS):
            self.table.horizontalHeaderItem(column).setToolTip(HEADER_TIPS.get(name, ""))
        self.table.verticalHeader().setVisible(False)
        # numbers as wide as they are; the names take the rest (elided, whole in a tooltip)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.itemSelectionChanged.connect(self.redraw)
        self.bars = LayerBars()
        self.pareto = ParetoChart()
        charts_row = QSplitter(Qt.Orientation.Horizontal)
        charts_row.addWidget(self.bars)
        charts_row.addWidget(self.pareto)
        charts_row.setStretchFactor(0, 3)  # the bars need room for the layer names
        charts_row.setStretchFactor(1, 2)
        self.charts = charts_row
        lower = QWidget()
        lower_layout = QVBoxLayout(lower)
        lower_layout.setContentsMargins(0, 0, 0, 0)
        lower_layout.addLayout(chart_bar)
        lower_layout.addWidget(charts_row, 1)
        body = QSplitter(Qt.Orientation.Vertical)
        body.addWidget(self.table)
        body.addWidget(lower)
        body.setSizes([130, 330])  # a few rows of variants; the charts get the rest
        for combo in (self.runtime, self.device):
            combo.currentIndexChanged.connect(self.refresh)
        for spin in (self.batch, self.threads):
            spin.valueChanged.connect(self.refresh)
        layout = QVBoxLayout(self)
        layout.addWidget(form)
        layout.addLayout(actions)
        layout.addWidget(self.status)
        layout.addWidget(body, 1)

    def measure_when_ready(self, after: str) -> None:
        """Measure (and profile the last variant) once ``after`` arrives: 'evaluation',
        'pruned' or 'finetuned' (used at launch)."""
        self._measure_after = after

    def _maybe_measure(self, event: str) -> None:
        if self._measure_after == event:
            self._measure_after = "profile"
            QTimer.singleShot(0, self.measure)

    # ---- variants -----------------------------------------------------------------------

    def profile_selected(self) -> DeviceProfile | None:
        name = self.target.currentData()
        return next((p for p in self.profiles if p.name == name), None)

    def device_estimate(self, variant: Variant) -> DeviceEstimate | None:
        """The selected target device's roofline estimate of ``variant`` (None: no device)."""
        profile = self.profile_selected()
        if profile is None or not self.variants:
            return None
        if self._estimator is None or self._estimator.batch != self.batch.value():
            self._estimator = DeviceEstimator.build(self.variants[0].model, self.batch.value())
        return self._estimator.estimate(profile, variant.plan)

    def _reset(self, *_args: object) -> None:
        self._estimator = None
        self.variants = []
        model = self.session.model
        if model is not None:
            params = sum(p.numel() for p in model.module.parameters())
            self.variants.append(Variant("original", model, None, params, None, None))
            self._on_evaluation()
        self.refresh()

    def _on_evaluation(self, *_args: object) -> None:
        if not self.variants:
            return
        original = self.variants[0]
        inventory, evaluation = self.session.inventory, self.session.evaluation
        if inventory is not None:
            original.macs = inventory.macs
        if evaluation is not None:
            original.quality = quality_of(evaluation)
            self._maybe_measure("evaluation")
        self.refresh()

    def _on_pruned(self, result: Any) -> None:
        if result is None or not self.variants:
            return
        self.variants.append(pruned_variant(result, self.variants))
        self.refresh()
        self._maybe_measure("pruned")

    def _on_finetuned(self, result: Any) -> None:
        pruned = self.session.pruned
        if result is None or not self.variants:
            return
        self.variants.append(finetuned_variant(result, pruned, self.variants))
        self.refresh()
        self._maybe_measure("finetuned")

    def settings_key(self) -> tuple:
        return (
            RUNTIMES[self.runtime.currentText()],
            self.batch.value(),
            self.threads.value(),
            self.device.currentData(),
        )

    # ---- jobs ---------------------------------------------------------------------------

    def measure(self) -> Job | None:
        """Measure every variant not yet measured with these settings, then estimate them."""
        if not self.variants or self.busy:
            return None
        runtime, batch, threads, device = key = self.settings_key()
        budget = float(self.budget.value())
        variants = list(self.variants)  # the job's copy; items name them by position
        todo = [v for v in variants if key not in v.measured]
        if not todo:
            todo = list(variants)  # measure again on request

        def work(progress: ProgressFn, cancel: CancelToken) -> Iterator[Any]:
            return measure_variants(variants, todo, key, budget, progress, cancel)

        self.job = self.runner.start_stream("Measuring latency", work)
        self._job_variants[self.job] = variants
        self.status.setText(f"Measuring {len(todo)} variant(s) with {runtime}, batch {batch}…")
        self._update_controls()
        return self.job

    def profile(self) -> Job | None:
        variant = self.selected()
        if variant is None or self.busy:
            return None
        runtime, batch, threads, device = key = self.settings_key()

        def work(progress: ProgressFn, cancel: CancelToken) -> Iterator[Any]:
            return profile_variant(variant, key, progress, cancel)

        self.profile_job = self.runner.start_stream("Per-layer latency", work)
        self._job_variants[self.profile_job] = [variant]
        self.status.setText(f"Profiling the layers of {variant.name} with {runtime}…")
        self._update_controls()
        return self.profile_job

    def cancel(self) -> None:
        for job in (self.job, self.profile_job):
            if job is not None and not job.done:
                job.cancel()

    @property
    def busy(self) -> bool:
        return any(j is not None and not j.done for j in (self.job, self.profile_job))

    def _on_partial(self, job: Job, item: object) -> None:
        if job not in (self.job, self.profile_job) or not isinstance(item, tuple):
            return
        kind, position, key, value = item
        variant = self._job_variants[job][position]
        if kind == "measured":
            variant.measured[key] = value
        elif kind == "estimated":
            variant.estimated[key] = value
        elif kind == "layers":
            variant.layers[key] = value
        self.refresh()

    def _on_finished(self, job: Job, result: object) -> None:
        if job is self.job:
            text = "Measured: medians of repeated runs after warm-up (measured on this machine)."
            if isinstance(result, str) and result:
                text += f" {result}."
                self.session.log(f"Latency: {result}", WARNING)
            else:
                text += (
                    " Estimated: the lookup table's prediction without running the model, scaled"
                    " so that the original's equals its measurement now (load moves the level)."
                )
            self.status.setText(text)
            self.session.log(self._log_line())
            if self._measure_after == "profile":
                self._measure_after = None
                self.table.selectRow(len(self.variants) - 1)
                QTimer.singleShot(0, self.profile)
        elif job is self.profile_job:
            self.status.setText("Per-layer times measured with the runtime's own profiler.")
        else:
            return
        self._update_controls()

    def _on_failed(self, job: Job, message: str) -> None:
        if job in (self.job, self.profile_job):
            self.status.setText(f"Latency failed: {message}")
            self.session.log_failure("Latency failed", message, job.traceback)
            self.error.emit("Latency failed", message)
            self._update_controls()

    def _on_cancelled(self, job: Job) -> None:
        if job in (self.job, self.profile_job):
            self.status.setText("Cancelled; the rows measured so far are kept.")
            self._update_controls()

    # ---- view ---------------------------------------------------------------------------

    def selected(self) -> Variant | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        row = rows[0].row() if rows else 0
        return self.variants[row] if 0 <= row < len(self.variants) else None

    def refresh(self, *_args: object) -> None:
        key = self.settings_key()
        keep = self.selected()
        profile = self.profile_selected()
        self.source.setText(f"source: {profile.source}" if profile is not None else "")
        self.source.setToolTip(profile.source if profile is not None else "")
        self.table.setRowCount(len(self.variants))
        for name in DEVICE_COLUMNS:  # empty without a target device
            self.table.setColumnHidden(COLUMNS.index(name), profile is None)
        base = self.variants[0].measured.get(key) if self.variants else None
        for i, v in enumerate(self.variants):
            first = v is self.variants[0]
            device, device_tip = self._device_cells(v)
            values = table_row(v, key, None if first else base, device)
            tips = row_tips(v, key, None if first else base, device_tip)
            for column, text in enumerate(values):
                item = QTableWidgetItem(text)
                item.setToolTip(tips.get(column, ""))
                if column:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                self.table.setItem(i, column, item)
        if keep in self.variants:
            self.table.selectRow(self.variants.index(keep))
        self.redraw()
        self._update_controls()

    def _device_cells(self, variant: Variant) -> tuple[tuple[str, str, str], str]:
        """The target-device cells, and the reason (for a tooltip) where it cannot estimate."""
        try:
            return device_cells(self.device_estimate(variant)), ""
        except StudioError as exc:
            return ("failed", "", ""), str(exc)

    def redraw(self, *_args: object) -> None:
        key = self.settings_key()
        variant = self.selected()
        layers = variant.layers.get(key, []) if variant is not None else []
        try:
            estimate = self.device_estimate(variant) if variant is not None else None
        except StudioError:
            estimate = None
        if variant is not None and layers:
            self.bars.show_measured(variant.name, layers)
        elif variant is not None and estimate is not None:
            self.bars.show_estimate(variant.name, estimate)
        else:
            self.bars.show_hint("Per-layer time: select a variant, then Per-layer profile")
        names, costs, qualities, cost_label = pareto_points(
            self.variants, key, by_latency=self.x_axis.currentIndex() == 0
        )
        self.pareto.set_points(names, costs, qualities, cost_label, "quality (%)")

    def _log_line(self) -> str:
        return log_line(self.variants, self.settings_key())

    def csv(self) -> str:
        return variants_csv(self.variants, self.settings_key())

    def save_png(self, path: str | Path) -> Path:
        return charts.save_png(self.charts, path, self.session.input_files())

    def save_csv(self, path: str | Path) -> Path:
        if not self.variants:
            raise StudioError("there is nothing measured to save yet")
        return write_atomic(path, self.csv(), self.session.input_files())

    def _update_controls(self) -> None:
        busy = self.busy
        self.measure_button.setEnabled(bool(self.variants) and not busy)
        self.profile_button.setEnabled(bool(self.variants) and not busy)
        self.cancel_button.setEnabled(busy)
        for widget in (self.runtime, self.device, self.batch, self.threads, self.budget):
            widget.setEnabled(not busy)
        self.saving.set_enabled(bool(self.variants))
