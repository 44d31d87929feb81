"""The Training tab: fine-tune the pruned model (with distillation from the original) while
live charts show loss, validation quality, learning rate and sparsity.

The run is a stream job on the runner: every record the core's :class:`FinetuneJob` yields
reaches the charts as a ``partial`` item. Pause blocks the job between steps; Cancel stops it
after the current step. Checkpoints go to a folder keyed by the model, the data and the
settings, so Start after a cancel (or a crash) continues from the last finished epoch; Start
over discards that checkpoint.

A language model (a Hugging Face folder on text data) trains on the text's calibration split
and validates on its validation split, with the core's text defaults in the form, and its
perplexity is charted beside the loss; it is saved as a Hugging Face folder or ONNX.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core.cluster.connection import Compute
from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, PauseToken, ProgressFn
from studio.core.models.loaded import LoadedModel
from studio.core.train.types import FinetuneResult, TrainRecord
from studio.ui import format as fmt
from studio.ui.panels.training_charts import TrainingCharts
from studio.ui.panels.training_form import TrainingForm
from studio.ui.panels.training_run import (
    RunBaseline,
    RunStarted,
    checkpoint_folder,
    describe_record,
    quality_metric,
    session_split,
    summary_text,
    training_stream,
)
from studio.ui.panels.training_save import TrainingSave
from studio.ui.runner import Job, JobRunner
from studio.ui.session import WARNING, Session
from studio.ui.widgets import charts
from studio.ui.widgets.speed_line import SpeedLine

BAR_STEPS = 1000


class TrainingPanel(TrainingSave, QWidget):
    """Fine-tunes ``session.pruned`` (or the loaded model when nothing was pruned)."""

    error = Signal(str, str)

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.job: Job | None = None
        self.baseline: RunBaseline | None = None  # the run's metrics before training
        self.pause_token = PauseToken()
        self.history: list[TrainRecord] = []
        self.checkpoint: Path | None = None  # folder of the last run started
        self.save_job: Job | None = None  # a transformer being written
        self._start_when_pruned = False
        self._epochs_when_pruned: int | None = None
        self._build()
        runner.partial.connect(self._on_partial)
        runner.progress.connect(self._on_progress)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)
        for signal in (session.model_changed, session.data_changed, session.pruned_changed):
            signal.connect(self._on_inputs_changed)
        session.compute_changed.connect(self._on_compute_changed)
        self._on_compute_changed(session.compute)
        self._on_inputs_changed()

    def _on_compute_changed(self, compute: Compute) -> None:
        if not self.running:
            note = " (no checkpoint folder on Ray: a cancelled run starts over)"
            self.where.setText(f"Runs on {compute.describe()}" + (note if compute.on_ray else ""))

    def _build(self) -> None:
        self.form = TrainingForm()
        self.subject = QLabel()
        self.subject.setWordWrap(True)
        self.start_button = self._button("Start", self.start, "train (continues a cancelled run)")
        self.pause_button = self._button("Pause", self.toggle_pause, "pause between two steps")
        self.cancel_button = self._button("Cancel", self.cancel, "stop after the current step")
        self.over_button = self._button(
            "Start over", self.start_over, "discard the checkpoint of these settings and start anew"
        )
        self.save_model_button = self._button(
            "Save model…", self._ask_save_model, "write the best epoch's model"
        )
        self.saving = charts.SaveButtons(
            self,
            self.session,
            self.save_png,
            self.save_csv,
            lambda suffix: f"{charts.model_stem(self.session)}-training{suffix}",
            ("Save training charts", "Save training history"),
            lambda title, message: self.error.emit(title, message),
        )
        self.bar = QProgressBar()
        self.bar.setRange(0, BAR_STEPS)
        self.eta = QLabel()
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.charts = TrainingCharts()
        self.where = QLabel()  # where training runs: this machine or Ray (Settings > Compute)
        self.where.setEnabled(False)
        self.where.setWordWrap(True)

        left = QWidget()
        column = QVBoxLayout(left)
        column.addWidget(self.subject)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.pause_button, self.cancel_button):
            buttons.addWidget(button)
        column.addLayout(buttons)
        more = QHBoxLayout()
        more.addWidget(self.over_button)
        more.addWidget(self.save_model_button)
        column.addLayout(more)
        column.addWidget(self.form)
        column.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(left)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(280)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

        right = QWidget()
        rcol = QVBoxLayout(right)
        rcol.setContentsMargins(0, 0, 0, 0)
        top = QHBoxLayout()
        top.addWidget(self.bar, 1)
        top.addWidget(self.eta)
        top.addWidget(self.saving.png)
        top.addWidget(self.saving.csv)
        rcol.addLayout(top)
        rcol.addWidget(self.status)
        self.speed = SpeedLine()  # the fine-tuned model against the original (SpeedWatch)
        rcol.addWidget(self.speed)
        rcol.addWidget(self.where)
        rcol.addWidget(self.charts, 1)
        splitter = QSplitter()
        splitter.addWidget(scroll)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([350, 900])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

    def _button(self, text: str, slot: Any, tip: str) -> QPushButton:
        button = QPushButton(text)
        button.setToolTip(tip)
        button.clicked.connect(slot)
        return button

    # ---- what is trained ----------------------------------------------------------------

    def student(self) -> LoadedModel | None:
        pruned = self.session.pruned
        return pruned.model if pruned is not None else self.session.model

    def teacher(self) -> LoadedModel | None:
        """The unpruned model, when there is a pruned one to distil into."""
        return self.session.model if self.session.pruned is not None else None

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done

    # ---- commands -----------------------------------------------------------------------

    def start_when_pruned(self, epochs: int | None = None) -> None:
        """Start fine-tuning as soon as the Planner has applied a plan (used at launch)."""
        self._epochs_when_pruned = epochs  # set when it starts: a model coming in after this
        self._start_when_pruned = True  # shows its own kind's defaults

    def start(self) -> Job | None:
        """Start fine-tuning, or continue the checkpointed run of the same settings."""
        student, data = self.student(), self.session.data
        if student is None or data is None or self.running:
            return None
        try:
            student.require("fine-tuning")
            settings = self.form.settings()
            train, val, _ = session_split(data, self.session.calibration)
        except StudioError as exc:
            self._fail("Cannot fine-tune", str(exc))
            return None
        teacher = self.teacher() if self.form.distilling else None
        self.checkpoint = checkpoint_folder(student, teacher, train, val, settings)
        self.pause_token = PauseToken()
        pause, folder, compute = self.pause_token, self.checkpoint, self.session.compute

        def work(progress: ProgressFn, cancel: CancelToken) -> Iterator[Any]:
            return training_stream(
                student, train, val, settings, teacher, folder, compute, pause, progress, cancel
            )

        self.history = []
        self.baseline = None
        metric = quality_metric(student, val)
        self.charts.reset(metric, self._reference(metric))
        # on Ray the job stays in the window's process, where the connection is
        self.job = self.runner.start_stream("Fine-tuning", work, isolate=not compute.on_ray)
        self.session.log(
            f"Fine-tuning {student.name}: {settings.epochs} epochs, {settings.optimizer}, "
            f"lr {settings.learning_rate:g}, batch {settings.batch_size}"
            + (f", distilling from {teacher.name}" if teacher is not None else "")
        )
        self.status.setText("Preparing: evaluating the model before training…")
        self._update_controls()
        return self.job

    def _start_launched(self) -> None:
        if self._epochs_when_pruned is not None:
            self.form.epochs.setValue(self._epochs_when_pruned)
        self.start()

    def toggle_pause(self) -> None:
        if not self.running:
            return
        if self.pause_token.paused:
            self.pause_token.resume()
            self.status.setText("Resumed.")
        else:
            self.pause_token.pause()
            self.status.setText("Paused after the current step: Resume goes on.")
        self._update_controls()

    def cancel(self) -> None:
        if self.running and self.job is not None:
            self.job.cancel()
            self.status.setText("Cancelling after the current step…")
            self._update_controls()

    def start_over(self) -> None:
        """Discard the checkpoint of the current settings, then start."""
        student, data = self.student(), self.session.data
        if student is None or data is None or self.running:
            return
        try:
            settings = self.form.settings()
            train, val, _ = session_split(data, self.session.calibration)
        except StudioError as exc:
            self._fail("Cannot fine-tune", str(exc))
            return
        teacher = self.teacher() if self.form.distilling else None
        shutil.rmtree(checkpoint_folder(student, teacher, train, val, settings), True)
        self.start()

    # ---- runner events ------------------------------------------------------------------

    def _on_partial(self, job: Job, item: object) -> None:
        if job is not self.job:
            return
        if isinstance(item, RunStarted):
            self.where.setText(f"Runs on {item.where}")
            if item.on_ray:
                self.session.log(f"Fine-tuning runs on {item.where}")
            for record in item.history:  # a continued run: what the checkpoint holds
                self._add(record)
            return
        if isinstance(item, RunBaseline):
            self.baseline = item
            return
        if isinstance(item, TrainRecord):
            if not self.history and self.baseline is not None:
                before = self.baseline.before
                self.charts.add_start(before.get(self.charts.quality_metric))
                reference = self.baseline.teacher_metrics.get("accuracy")
                if reference is not None and self.charts.quality_metric == "accuracy":
                    self.charts.set_reference(reference)
            self._add(item)
            self.status.setText(self._describe(item))

    def _add(self, record: TrainRecord) -> None:
        self.history.append(record)
        self.charts.add(record)
        if len(self.history) == 1:
            self._update_controls()

    def _on_progress(self, job: Job, fraction: float, message: str, eta: object) -> None:
        if job is not self.job:
            return
        self.bar.setValue(int(fraction * BAR_STEPS))
        paused = self.pause_token.paused
        self.eta.setText(
            "paused" if paused else f"about {fmt.duration(eta)} left" if eta is not None else ""  # type: ignore[arg-type]
        )

    def _on_finished(self, job: Job, result: object) -> None:
        if job is self.save_job:
            self.session.log(f"Saved the fine-tuned model to {result}")
            self._update_controls()
            return
        if job is not self.job or not isinstance(result, FinetuneResult):
            return
        self.charts.redraw()
        self.bar.setValue(BAR_STEPS)
        self.eta.setText("")
        self.session.set_finetuned(result)
        text = summary_text(result)
        self.status.setText(text)
        self.session.log(text)
        self._update_controls()

    def _on_failed(self, job: Job, message: str) -> None:
        if job is self.save_job:
            self._fail("Could not save the model", message, job.traceback)
            self._update_controls()
        if job is self.job:
            self.eta.setText("")
            self._fail("Fine-tuning failed", message, job.traceback)
            self._update_controls()

    def _on_cancelled(self, job: Job) -> None:
        if job is not self.job:
            return
        self.eta.setText("")
        epochs = sum(1 for r in self.history if r.kind == "epoch")
        text = (
            f"Cancelled after {epochs} finished epoch(s). Their checkpoint is kept: Start "
            "continues from there with the same settings, Start over discards it."
        )
        self.status.setText(text)
        self.session.log(f"Fine-tuning cancelled after {epochs} epoch(s)", WARNING)
        self._update_controls()

    def _fail(self, title: str, message: str, trace: str = "") -> None:
        self.status.setText(f"{title}: {message}")
        self.session.log_failure(title, message, trace)
        self.error.emit(title, message)

    # ---- text ---------------------------------------------------------------------------

    def _reference(self, metric: str = "accuracy") -> float | None:
        """The unpruned model's quality on the evaluation data (the dashed line)."""
        evaluation, pruned = self.session.evaluation, self.session.pruned
        if pruned is None:
            return None
        if metric == "perplexity":  # the unpruned model on the validation text
            before = pruned.quality_before
            if before is not None and before.perplexity is not None:
                return before.perplexity
            return evaluation.perplexity if evaluation is not None else None
        if evaluation is None:
            return None
        return evaluation.accuracy if self.session.data and self.session.data.labelled else None

    def _describe(self, record: TrainRecord) -> str:
        charts = self.charts
        return describe_record(record, self.form.epochs.value(), charts.best, charts.quality_metric)

    # ---- state --------------------------------------------------------------------------

    def _on_inputs_changed(self, *_args: object) -> None:
        if self._start_when_pruned and self.session.pruned is not None:
            self._start_when_pruned = False
            QTimer.singleShot(0, self._start_launched)
        student, data = self.student(), self.session.data
        self.form.use_defaults(student is not None and student.is_text)
        if student is None:
            text = "Open a model, prune it in the Planner, then fine-tune it here."
        elif data is None:
            text = f"{student.name}: open data to fine-tune on (Data menu)."
        else:
            try:
                _, _, split = session_split(data, self.session.calibration)
            except StudioError as exc:
                split = str(exc)
            params = sum(p.numel() for p in student.module.parameters())
            what = "the pruned model" if self.session.pruned is not None else student.name
            text = f"Fine-tunes {what} ({fmt.thousands(params)} parameters); {split}."
        self.subject.setText(text)
        teacher = self.teacher()
        self.form.set_teacher_available(
            teacher is not None, "distillation needs a pruned model and the original beside it"
        )
        self._update_controls()

    def _update_controls(self, *_args: object) -> None:
        running = self.running
        ready = self.student() is not None and self.session.data is not None
        self.start_button.setEnabled(ready and not running)
        self.over_button.setEnabled(ready and not running)
        self.pause_button.setEnabled(running)
        self.pause_button.setText("Resume" if self.pause_token.paused and running else "Pause")
        self.cancel_button.setEnabled(running and not (self.job and self.job.token.cancelled))
        self.form.setEnabled(not running)
        saving = self.save_job is not None and not self.save_job.done
        self.save_model_button.setEnabled(
            self.session.finetuned is not None and not running and not saving
        )
        self.saving.set_enabled(bool(self.history))
