"""The job runner: the only place in the studio where background threads start.

A job is a plain core call ``fn(progress, cancel)``; a stream job is a core generator
``gen(progress, cancel)`` whose items reach the GUI as ``partial`` signals (one row, one epoch)
and whose ``return`` value is the job's result. Each job runs in a process of its own
(:mod:`studio.core.isolation`), driven from a ``QThreadPool`` thread: a native crash or hang in
torch, ONNX Runtime or a converted model ends the job (reported as failed, naming the job), not
the window, and Cancel kills a job that does not stop within 0.3 s. Jobs that must share
the window's process (the Ray connection, a server the window shows) pass ``isolate=False``; a
job whose closure does not pickle runs on the thread, with a warning in the log.
The worker thread never touches a widget: it emits the runner's private signals, which Qt
queues to the GUI thread (the runner lives there); the runner updates the :class:`Job` and
re-emits its public signals, so every slot connected to the runner runs on the GUI thread.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import shiboken6
from PySide6.QtCore import QObject, QThreadPool, QTimer, Signal, Slot

from studio.core import isolation
from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, ProgressFn, drain

log = logging.getLogger("studio.ui")

# Progress is forwarded to the GUI only when it moves this much or this long has passed.
MIN_STEP = 0.01
MIN_INTERVAL_S = 0.2
# No ETA before this fraction or this much elapsed time: early estimates are noise.
ETA_MIN_FRACTION = 0.01
ETA_MIN_ELAPSED_S = 0.3

RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"

_counter = itertools.count(1)
_runners: weakref.WeakSet[JobRunner] = weakref.WeakSet()


@dataclass(eq=False)
class Job:
    """One unit of background work and what became of it (updated on the GUI thread)."""

    name: str
    token: CancelToken = field(default_factory=CancelToken)
    isolate: bool = True  # in a process of its own (studio.core.isolation)
    id: int = field(default_factory=lambda: next(_counter))
    state: str = RUNNING
    fraction: float = 0.0
    message: str = ""
    eta: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    result: Any = None
    error: BaseException | None = None  # the exception a failed job raised
    error_message: str = ""
    traceback: str = ""  # only for unexpected errors; written to the log, never to a dialog

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def cancel(self) -> None:
        self.token.cancel()


def estimate_eta(elapsed: float, fraction: float) -> float | None:
    """Seconds left, extrapolating the rate so far; ``None`` while too early to tell."""
    if fraction < ETA_MIN_FRACTION or elapsed < ETA_MIN_ELAPSED_S:
        return None
    if fraction >= 1.0:
        return 0.0
    return elapsed * (1.0 - fraction) / fraction


def error_message(exc: BaseException) -> str:
    """The one-line message shown to the user for an exception raised by a job."""
    if isinstance(exc, StudioError):
        text = str(exc).strip() or type(exc).__name__
        return text.splitlines()[0]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"Unexpected error: {type(exc).__name__}: {first}"[:400].rstrip(": ")


Emit = Callable[[Any], None]


def callback_stream(
    fn: Callable[[ProgressFn, CancelToken, Emit], Any],
) -> Callable[[ProgressFn, CancelToken], Iterator[Any]]:
    """A core call that hands partial results to a callback (``on_row=``) instead of
    yielding them, as a stream job's generator function: ``fn(progress, cancel, emit)`` runs
    on a helper thread (in the job's process) and every ``emit(item)`` is yielded here; its
    return value is the generator's. The helper stops at ``fn``'s next cancel check."""

    def stream(progress: ProgressFn, cancel: CancelToken) -> Iterator[Any]:
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        def run() -> None:
            try:
                items.put(("done", fn(progress, cancel, lambda item: items.put(("item", item)))))
            except BaseException as exc:  # noqa: BLE001 - raised again by the generator
                items.put(("failed", exc))

        threading.Thread(target=run, name="studio-job-callbacks", daemon=True).start()
        while True:
            kind, value = items.get()
            if kind == "item":
                yield value
            elif kind == "done":
                return value
            else:
                raise value

    return stream


class GuiThreadCollector(QObject):
    """Python's cyclic garbage collection, run only on the GUI thread.

    Left automatic, a collection can start on a worker thread and destroy Qt objects there
    (a panel or a signal closure in a reference cycle) while the GUI thread is deleting
    widgets: the two then wait for each other's locks for ever. So automatic collection is
    switched off and this timer collects, by the usual thresholds, on the GUI thread
    (pyqtgraph's GarbageCollector does the same)."""

    INTERVAL_MS = 500

    def __init__(self) -> None:
        super().__init__()
        self.threshold = gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.collect)
        self.timer.start(self.INTERVAL_MS)

    def collect(self) -> None:
        young, middle, old = gc.get_count()
        if young > self.threshold[0]:
            generation = 0
            if middle > self.threshold[1]:
                generation = 2 if old > self.threshold[2] else 1
            gc.collect(generation)


_collector: GuiThreadCollector | None = None


def collect_on_gui_thread() -> None:
    """Install the GUI-thread collector once (called on the GUI thread, with the app up)."""
    global _collector
    if _collector is None:
        _collector = GuiThreadCollector()


def isolation_enabled() -> bool:
    """Jobs run in processes of their own unless ``STUDIO_IN_PROCESS=1`` (for debugging: a
    crash then ends the window) or the platform cannot."""
    return isolation.available() and not os.environ.get("STUDIO_IN_PROCESS")


def running_job_count() -> int:
    """Jobs still executing on any runner's threads (used by tests to catch dangling work)."""
    return sum(r.thread_count() for r in list(_runners) if shiboken6.isValid(r))


class JobRunner(QObject):
    """Starts jobs on a private thread pool and reports on them through GUI-thread signals."""

    started = Signal(object)  # job
    progress = Signal(object, float, str, object)  # job, fraction, message, eta seconds | None
    partial = Signal(object, object)  # job, one item yielded by a stream job
    finished = Signal(object, object)  # job, result
    failed = Signal(object, str)  # job, one-line message
    cancelled = Signal(object)  # job
    idle = Signal()  # the last running job ended (after its finished/failed/cancelled slots ran)

    # emitted from worker threads; queued to the GUI thread because the runner lives there
    _worker_progress = Signal(object, float, str, object)
    _worker_partial = Signal(object, object)
    _worker_done = Signal(object, str, object, object, str)  # job, state, result, error, traceback

    def __init__(self, parent: QObject | None = None, max_threads: int = 1) -> None:
        """``max_threads`` jobs run at once; by default one, the rest wait their turn.

        Jobs run models, and torch.fx tracing (scans, blocks) patches ``nn.Module.__call__``
        for the whole process while it traces: a second job running a model at that moment
        fails. One job at a time is also all two cores can use: each job's torch ops already
        use every core.
        """
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(max_threads)
        self._jobs: list[Job] = []
        self._closed = False
        self._worker_progress.connect(self._on_worker_progress)
        self._worker_partial.connect(self._on_worker_partial)
        collect_on_gui_thread()
        self._worker_done.connect(self._on_worker_done)
        _runners.add(self)
        if isolation_enabled():
            isolation.warm_up()  # the first job then starts in milliseconds, not seconds

    @property
    def jobs(self) -> list[Job]:
        """Jobs that have not ended yet, oldest first."""
        return list(self._jobs)

    def is_busy(self) -> bool:
        return bool(self._jobs)

    def thread_count(self) -> int:
        return self._pool.activeThreadCount()

    def start(
        self, name: str, fn: Callable[[ProgressFn, CancelToken], Any], isolate: bool = True
    ) -> Job:
        """Run ``fn(progress, cancel)`` in the background and return its :class:`Job`."""
        return self._submit(Job(name, isolate=isolate), fn, None)

    def start_stream(
        self,
        name: str,
        gen: Callable[[ProgressFn, CancelToken], Iterator[Any]],
        isolate: bool = True,
    ) -> Job:
        """Run the generator ``gen(progress, cancel)``: each item it yields is emitted as
        ``partial(job, item)`` on the GUI thread; what it returns is the job's result."""
        job = Job(name, isolate=isolate)  # made before the thread starts: items emit with it

        def emit(item: Any) -> None:
            if not job.token.cancelled:
                self._worker_partial.emit(job, item)

        return self._submit(job, gen, emit)

    def start_callbacks(
        self,
        name: str,
        fn: Callable[[ProgressFn, CancelToken, Emit], Any],
        isolate: bool = True,
    ) -> Job:
        """Run ``fn(progress, cancel, emit)``, a core call that reports partial results to a
        callback: each ``emit(item)`` is emitted as ``partial(job, item)`` on the GUI thread
        (see :func:`callback_stream`); what ``fn`` returns is the job's result."""
        return self.start_stream(name, callback_stream(fn), isolate=isolate)

    def _submit(
        self,
        job: Job,
        fn: Callable[[ProgressFn, CancelToken], Any],
        on_item: Callable[[Any], None] | None,
    ) -> Job:
        if self._closed:
            raise RuntimeError("the job runner has been shut down")
        self._jobs.append(job)
        self._pool.start(lambda: self._execute(job, fn, on_item))
        self.started.emit(job)
        return job

    def cancel_all(self) -> None:
        for job in self._jobs:
            job.cancel()

    def wait_all(self, timeout: float = 30.0) -> bool:
        """Block until every worker thread has returned; ``False`` if ``timeout`` s passed."""
        return self._pool.waitForDone(int(timeout * 1000))

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Cancel everything, wait for the threads, and drop results that arrive later."""
        self._closed = True
        self.cancel_all()
        return self.wait_all(timeout)

    # --- worker thread -------------------------------------------------------------------

    def _execute(
        self,
        job: Job,
        fn: Callable[[ProgressFn, CancelToken], Any],
        on_item: Callable[[Any], None] | None,
    ) -> None:
        last = [-1.0, 0.0]  # fraction and time of the last forwarded report

        def progress(fraction: float, message: str = "") -> None:
            now = time.monotonic()
            fraction = min(max(float(fraction), 0.0), 1.0)
            if (
                abs(fraction - last[0]) < MIN_STEP
                and now - last[1] < MIN_INTERVAL_S
                and fraction < 1.0
            ):
                return
            last[0], last[1] = fraction, now
            eta = estimate_eta(now - job.started_at, fraction)
            self._worker_progress.emit(job, fraction, str(message), eta)

        try:
            job.token.check()
            result = self._call(job, fn, on_item, progress)
        except Cancelled as exc:
            self._worker_done.emit(job, CANCELLED, None, exc, "")
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the GUI
            if job.token.cancelled:
                self._worker_done.emit(job, CANCELLED, None, exc, "")
            else:
                trace = "" if isinstance(exc, StudioError) else traceback.format_exc()
                self._worker_done.emit(job, FAILED, None, exc, trace)
        else:
            # the user asked to stop: a result that arrives anyway is discarded
            state = CANCELLED if job.token.cancelled else FINISHED
            self._worker_done.emit(job, state, result, None, "")

    def _call(
        self,
        job: Job,
        fn: Callable[[ProgressFn, CancelToken], Any],
        on_item: Callable[[Any], None] | None,
        progress: ProgressFn,
    ) -> Any:
        """``fn`` in its own process when the job is isolated and can be, else here."""
        if job.isolate and isolation_enabled():
            try:
                return isolation.run_isolated(job.name, fn, progress, job.token, on_item)
            except isolation.NotIsolatable as exc:
                log.warning("job %s runs in the window's process: %s", job.name, exc)
        if on_item is None:
            return fn(progress, job.token)
        return drain(fn(progress, job.token), job.token, on_item)

    # --- GUI thread ----------------------------------------------------------------------

    @Slot(object, float, str, object)
    def _on_worker_progress(self, job: Job, fraction: float, message: str, eta: object) -> None:
        if job.done or self._closed:
            return
        job.fraction, job.message, job.eta = fraction, message, eta  # type: ignore[assignment]
        self.progress.emit(job, fraction, message, eta)

    @Slot(object, object)
    def _on_worker_partial(self, job: Job, item: object) -> None:
        if job.done or self._closed or job.token.cancelled:
            return
        self.partial.emit(job, item)

    @Slot(object, str, object, object, str)
    def _on_worker_done(
        self, job: Job, state: str, result: object, error: object, trace: str
    ) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        job.state = state
        elapsed = time.monotonic() - job.started_at
        if self._closed:
            return
        if state == FINISHED:
            job.result, job.fraction = result, 1.0
            log.info("job %s finished in %.2f s", job.name, elapsed)
            self.finished.emit(job, result)
        elif state == CANCELLED:
            log.info("job %s cancelled after %.2f s", job.name, elapsed)
            self.cancelled.emit(job)
        else:
            assert isinstance(error, BaseException)
            job.error, job.error_message, job.traceback = error, error_message(error), trace
            if trace:
                log.error("job %s failed:\n%s", job.name, trace)
            self.failed.emit(job, job.error_message)
        if not self._jobs:
            self.idle.emit()
