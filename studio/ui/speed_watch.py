"""The speed check after Apply and fine-tuning: each new variant is timed against the original
in the background (:func:`studio.core.latency.speed_check.check_speed`, ONNX Runtime, batch 1,
side by side), the result is logged (a warning when the variant is not faster) and shown in one
line by the Result and Training tabs (:class:`studio.ui.widgets.speed_line.SpeedLine`), with the
fix, re-planning with runtime channels, one click away."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, Signal

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.speed_check import SpeedCheck, check_speed
from studio.ui.runner import Job, JobRunner
from studio.ui.session import INFO, WARNING, Session

KINDS = ("pruned", "fine-tuned")


class SpeedWatch(QObject):
    """Times every new pruned and fine-tuned model against the session's original."""

    checked = Signal(str, object)  # kind ("pruned" / "fine-tuned"), SpeedCheck | None (stale)
    checking = Signal(str)  # kind: a check started

    def __init__(self, session: Session, runner: JobRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.enabled = True
        self.results: dict[str, SpeedCheck] = {}
        self.jobs: dict[str, Job] = {}
        session.pruned_changed.connect(lambda r: self._changed("pruned", r))
        session.finetuned_changed.connect(lambda r: self._changed("fine-tuned", r))
        session.model_changed.connect(lambda _m: self._changed("pruned", None))
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)

    def _changed(self, kind: str, result: Any) -> None:
        stale = KINDS[KINDS.index(kind) :]  # a new pruned model makes its fine-tuning stale
        for key in stale:
            job = self.jobs.pop(key, None)
            if job is not None and not job.done:
                job.cancel()
            self.results.pop(key, None)
            self.checked.emit(key, None)
        if result is not None and self.enabled:
            self.check(kind, result.model)

    def check(self, kind: str, variant: Any) -> Job | None:
        """Time ``variant`` (a LoadedModel) against the session's model in the background."""
        original = self.session.model
        if original is None or variant is None:
            return None
        if getattr(self.session.pruned, "plan", None) is not None:
            if self.session.pruned.plan.method in ("unstructured", "nm"):
                return None  # zeros: a dense runtime is not faster, and nobody expects it

        def work(progress: ProgressFn, cancel: CancelToken) -> SpeedCheck:
            progress(0.0, "timing against the original")
            return check_speed(original, variant, progress=progress, cancel=cancel)

        self.jobs[kind] = self.runner.start(f"Speed check ({kind})", work)
        self.checking.emit(kind)
        return self.jobs[kind]

    def _kind(self, job: Job) -> str | None:
        return next((k for k, j in self.jobs.items() if j is job), None)

    def _on_finished(self, job: Job, result: object) -> None:
        kind = self._kind(job)
        if kind is None or not isinstance(result, SpeedCheck):
            return
        self.results[kind] = result
        level = INFO if result.faster else WARNING
        self.session.log(f"Speed check, {kind}: {result.line()}", level)
        self.checked.emit(kind, result)

    def _on_failed(self, job: Job, message: str) -> None:
        kind = self._kind(job)
        if kind is not None:
            self.session.log(f"Speed check, {kind}, failed: {message}", WARNING)
