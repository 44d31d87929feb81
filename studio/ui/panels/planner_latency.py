"""The Planner's latency estimate: a :class:`LatencyPredictor` for the session's model, built
in the background on request (micro-benchmarks the first time on a machine, then from the
disk cache), read on every slider move and by latency-target allocation."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QObject, Signal

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.measure import default_threads
from studio.core.latency.predict import LatencyPredictor
from studio.core.plan.costs import CostModel
from studio.core.plan.plan import PruningPlan
from studio.ui.runner import Job, JobRunner
from studio.ui.session import Session

RUNTIME, BATCH = "onnxruntime", 1


class PlannerLatency(QObject):
    """Holds the predictor of the session's model; ``ready`` is emitted once it is built."""

    ready = Signal()
    failed = Signal(str)  # one-line message (also emitted, empty, when cancelled)

    def __init__(self, session: Session, runner: JobRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.session, self.runner = session, runner
        self.predictor: LatencyPredictor | None = None
        self.job: Job | None = None
        self._then: list[Callable[[], object]] = []
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_ended)
        runner.cancelled.connect(self._on_ended)
        session.model_changed.connect(self.forget)

    @property
    def building(self) -> bool:
        return self.job is not None and not self.job.done

    def forget(self, *_args: object) -> None:
        if self.building and self.job is not None:
            self.job.cancel()
        self.predictor, self.job, self._then = None, None, []

    def build(self, cost: CostModel | None, then: Callable[[], object] | None = None) -> Job | None:
        """Build the predictor in the background (``then`` runs once it is ready)."""
        if then is not None:
            self._then.append(then)
        model = self.session.model
        if model is None or self.building:
            return self.job if self.building else None
        replica = model.replica()
        structured = cost if cost is not None and cost.method == "structured" else None
        threads = default_threads()

        def work(progress: ProgressFn, cancel: CancelToken) -> LatencyPredictor:
            return LatencyPredictor.build(
                replica, RUNTIME, BATCH, threads, progress=progress, cancel=cancel, cost=structured
            )

        self.job = self.runner.start("Calibrating the latency estimate", work)
        return self.job

    def _on_finished(self, job: Job, result: object) -> None:
        if job is not self.job or result is None:
            return
        self.predictor = result  # type: ignore[assignment]
        p = result
        self.session.log(
            f"Latency estimate ready ({RUNTIME}, batch {BATCH}, {p.threads} threads): the "
            f"unpruned model {p.original_ms:.3f} ms estimated"
            + (f", {p.measured_ms:.3f} ms measured" if p.measured_ms else "")
            + (f"; {p.calibrated_points} micro-benchmarks run" if p.calibrated_points else "")
        )
        then, self._then = self._then, []
        self.ready.emit()
        for action in then:
            action()

    def _on_ended(self, job: Job, *args: object) -> None:
        if job is self.job:
            self._then = []
            self.failed.emit(str(args[0]) if args else "")

    def text(self, plan: PruningPlan) -> str:
        """The summary strip's latency part (empty without a predictor)."""
        p = self.predictor
        if p is None or plan.method != "structured":
            return ""
        after = p.predict(plan).total_ms
        return (
            f"<b>Latency</b> {p.original_ms:.3f} → {after:.3f} ms "
            f"({after / max(p.original_ms, 1e-9):.1%}; estimated, ONNX Runtime, batch {BATCH}, "
            f"{p.threads} threads)"
        )
