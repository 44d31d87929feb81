"""Status-bar job indicator: name, message, progress bar, ETA and a Cancel button."""

from __future__ import annotations

from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from studio.ui import format as fmt
from studio.ui.runner import Job, JobRunner

BAR_STEPS = 1000


class JobProgressWidget(QWidget):
    """Shows the newest running job of ``runner``; hidden while no job runs."""

    def __init__(self, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        self.label = QLabel()
        self.bar = QProgressBar()
        self.bar.setRange(0, BAR_STEPS)
        self.bar.setFixedWidth(220)
        self.bar.setTextVisible(True)
        self.eta_label = QLabel()
        self.eta_label.setMinimumWidth(110)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running job")
        self.cancel_button.clicked.connect(self.cancel_current)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in (self.label, self.bar, self.eta_label, self.cancel_button):
            layout.addWidget(widget)
        runner.started.connect(self._refresh)
        runner.progress.connect(self._refresh)
        for signal in (runner.finished, runner.failed, runner.cancelled):
            signal.connect(self._refresh)
        self.setVisible(False)

    def current(self) -> Job | None:
        """The oldest job: the one running (the others wait their turn)."""
        jobs = self.runner.jobs
        return jobs[0] if jobs else None

    def cancel_current(self) -> None:
        job = self.current()
        if job is not None:
            job.cancel()
            self.label.setText(f"Cancelling {job.name}…")
            self.cancel_button.setEnabled(False)

    def _refresh(self, *_args: object) -> None:
        job = self.current()
        if job is None:
            self.setVisible(False)
            return
        others = len(self.runner.jobs) - 1
        text = job.name + (f": {job.message}" if job.message else "")
        if others:
            text += f"  (+{others} waiting)"
        if job.token.cancelled:
            text = f"Cancelling {job.name}…"
        self.label.setText(text)
        self.bar.setValue(int(job.fraction * BAR_STEPS))
        self.bar.setFormat(f"{job.fraction * 100:.0f} %")
        self.eta_label.setText(f"about {fmt.duration(job.eta)} left" if job.eta is not None else "")
        self.cancel_button.setEnabled(not job.token.cancelled)
        self.setVisible(True)
