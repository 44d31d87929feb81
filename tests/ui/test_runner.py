"""The job runner: signals arrive on the GUI thread, errors become messages, cancel works,
and jobs run in processes of their own: a native crash or a hang ends the job, not the window."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest

from studio.core.errors import StudioError
from studio.core.jobs import PauseToken
from studio.ui.runner import CANCELLED, FAILED, FINISHED, JobRunner, error_message, estimate_eta


@pytest.fixture
def runner(qtbot):  # type: ignore[no-untyped-def]
    r = JobRunner()
    yield r
    r.shutdown(timeout=10)


def test_progress_and_result_arrive_on_gui_thread(qtbot, runner: JobRunner) -> None:
    seen: list[tuple[float, str, bool]] = []
    gui = threading.current_thread()
    runner.progress.connect(
        lambda job, f, msg, eta: seen.append((f, msg, threading.current_thread() is gui))
    )
    worker_threads = []

    def work(progress, cancel):  # type: ignore[no-untyped-def]
        worker_threads.append(threading.current_thread())
        progress(0.5, "half way")
        return 42

    with qtbot.waitSignal(runner.finished, timeout=5000) as blocker:
        job = runner.start("answer", work, isolate=False)  # on a thread of this process
    assert blocker.args == [job, 42]
    assert job.state == FINISHED and job.result == 42
    assert worker_threads[0] is not gui
    assert seen and seen[0][:2] == (0.5, "half way") and all(on_gui for *_, on_gui in seen)
    assert not runner.is_busy()


def test_studio_error_becomes_its_one_line_message(qtbot, runner: JobRunner) -> None:
    def work(progress, cancel):  # type: ignore[no-untyped-def]
        raise StudioError("the file is not a model")

    with qtbot.waitSignal(runner.failed, timeout=5000) as blocker:
        job = runner.start("bad", work)
    assert blocker.args == [job, "the file is not a model"]
    assert job.state == FAILED and job.traceback == ""


def test_unexpected_error_keeps_traceback_for_the_log_only(qtbot, runner: JobRunner) -> None:
    def work(progress, cancel):  # type: ignore[no-untyped-def]
        raise ValueError("boom\nsecond line")

    with qtbot.waitSignal(runner.failed, timeout=5000) as blocker:
        job = runner.start("bad", work)
    assert blocker.args[1] == "Unexpected error: ValueError: boom"
    assert "Traceback" in job.traceback and "second line" in job.traceback
    assert isinstance(job.error, ValueError)


def test_cancel_stops_a_looping_job_within_a_second(qtbot, runner: JobRunner) -> None:
    def work(progress, cancel):  # type: ignore[no-untyped-def]
        while True:
            progress(0.5, "looping")
            cancel.check()
            time.sleep(0.01)

    with qtbot.waitSignal(runner.progress, timeout=30_000):
        job = runner.start("forever", work)
    start = time.monotonic()
    with qtbot.waitSignal(runner.cancelled, timeout=1000) as blocker:
        job.cancel()
    assert blocker.args == [job]
    assert time.monotonic() - start < 1.0 and job.state == CANCELLED
    assert runner.wait_all(2)


def test_eta_is_reported_and_progress_is_rate_limited(qtbot, runner: JobRunner) -> None:
    events: list[tuple[float, object]] = []
    runner.progress.connect(lambda job, f, msg, eta: events.append((f, eta)))

    def work(progress, cancel):  # type: ignore[no-untyped-def]
        for i in range(1, 11):
            time.sleep(0.06)
            for k in range(1000):  # many tiny steps: most must be dropped
                progress((i - 1 + k / 1000) / 10, f"step {i}")
        return None

    with qtbot.waitSignal(runner.finished, timeout=10_000):
        runner.start("steps", work)
    etas = [eta for _, eta in events if eta is not None]
    assert etas and all(eta >= 0 for eta in etas)
    assert len(events) <= 150  # 10,000 calls -> about one per percent
    assert events[-1][0] == pytest.approx(0.9999, abs=0.01)


def test_cancel_all_and_wait_all(qtbot, runner: JobRunner) -> None:
    def work(progress, cancel):  # type: ignore[no-untyped-def]
        while True:
            cancel.check()
            time.sleep(0.01)

    jobs = [runner.start(f"job {i}", work) for i in range(3)]
    with qtbot.waitSignal(runner.idle, timeout=5000):
        runner.cancel_all()
    assert runner.wait_all(2)
    assert [j.state for j in jobs] == [CANCELLED] * 3


def test_estimate_eta_and_error_message() -> None:
    assert estimate_eta(0.1, 0.5) is None  # too early
    assert estimate_eta(2.0, 0.005) is None
    assert estimate_eta(2.0, 0.5) == pytest.approx(2.0)
    assert estimate_eta(3.0, 1.0) == 0.0
    assert error_message(StudioError("one\ntwo")) == "one"
    assert error_message(KeyError("k")) == "Unexpected error: KeyError: 'k'"
    assert error_message(RuntimeError()) == "Unexpected error: RuntimeError"


def test_stream_items_arrive_in_order_then_the_return_value(qtbot, runner: JobRunner) -> None:
    items: list[tuple[int, bool]] = []
    gui = threading.current_thread()
    runner.partial.connect(
        lambda job, item: items.append((item, threading.current_thread() is gui))
    )

    def rows(progress, cancel):  # type: ignore[no-untyped-def]
        for i in range(50):
            progress(i / 50)
            yield i
        return "all rows"

    with qtbot.waitSignal(runner.finished, timeout=5000) as blocker:
        job = runner.start_stream("rows", rows)
    assert blocker.args == [job, "all rows"]
    assert [i for i, _ in items] == list(range(50)) and all(on_gui for _, on_gui in items)


def test_cancelled_stream_stops_and_emits_nothing_more(qtbot, runner: JobRunner) -> None:
    items: list[int] = []
    runner.partial.connect(lambda job, item: items.append(item))

    def endless(progress, cancel):  # type: ignore[no-untyped-def]
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(0.01)

    job = runner.start_stream("endless", endless)
    qtbot.waitUntil(lambda: len(items) >= 3, timeout=5000)
    with qtbot.waitSignal(runner.cancelled, timeout=5000):
        job.cancel()
    count = len(items)
    qtbot.wait(100)
    assert job.state == CANCELLED and len(items) == count and items == list(range(count))


def test_garbage_is_collected_on_the_gui_thread_only(qtbot, runner: JobRunner) -> None:
    import gc

    threads: set[threading.Thread] = set()

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            threads.add(threading.current_thread())

    def churn(progress, cancel):  # type: ignore[no-untyped-def]
        for _ in range(200_000):
            cycle: list = []
            cycle.append(cycle)  # garbage only the cyclic collector frees
        return "done"

    gc.callbacks.append(seen)
    try:
        with qtbot.waitSignal(runner.finished, timeout=30_000):
            runner.start("churn", churn, isolate=False)  # the garbage is made here
        qtbot.wait(1200)  # the GUI-thread collector's timer runs
    finally:
        gc.callbacks.remove(seen)
    assert not gc.isenabled()
    assert threads == {threading.current_thread()}  # collections ran, and only here


# ---- jobs in processes of their own -------------------------------------------------------


def test_jobs_run_in_a_process_of_their_own(qtbot, runner: JobRunner) -> None:
    def work(progress, cancel):  # type: ignore[no-untyped-def]
        return os.getpid()

    with qtbot.waitSignal(runner.finished, timeout=30_000) as blocker:
        runner.start("where", work)
    assert blocker.args[1] != os.getpid()


def test_a_native_crash_fails_the_job_and_the_next_job_runs(qtbot, runner: JobRunner) -> None:
    def crash(progress, cancel):  # type: ignore[no-untyped-def]
        progress(0.3, "reading the weights")
        ctypes.string_at(0)  # a null dereference: SIGSEGV

    with qtbot.waitSignal(runner.failed, timeout=30_000) as blocker:
        job = runner.start("Channel norms", crash)
    assert job.state == FAILED
    assert blocker.args[1] == (
        "Channel norms crashed in native code (SIGSEGV) during 'reading the weights'; "
        "the session is unchanged"
    )

    def abort(progress, cancel):  # type: ignore[no-untyped-def]
        os.abort()

    with qtbot.waitSignal(runner.failed, timeout=30_000) as blocker:
        runner.start("Pruning", abort)
    assert "Pruning crashed in native code (SIGABRT)" in blocker.args[1]
    with qtbot.waitSignal(runner.finished, timeout=30_000) as blocker:
        runner.start("after", lambda progress, cancel: "still working")
    assert blocker.args[1] == "still working"


def test_cancel_ends_a_job_stuck_in_native_code_within_a_second(qtbot, runner: JobRunner) -> None:
    def stuck(progress, cancel):  # type: ignore[no-untyped-def]
        progress(0.1, "in native code")
        ctypes.CDLL(None).sleep(600)  # libc's sleep: no Python check runs for 10 minutes

    with qtbot.waitSignal(runner.progress, timeout=30_000):
        job = runner.start("stuck", stuck)
    qtbot.wait(200)
    start = time.monotonic()
    with qtbot.waitSignal(runner.cancelled, timeout=2000):
        job.cancel()
    assert time.monotonic() - start < 1.0 and job.state == CANCELLED
    assert runner.wait_all(2)


def test_pause_reaches_the_job_process(qtbot, runner: JobRunner) -> None:
    pause = PauseToken()
    pause.pause()

    def work(progress, cancel):  # type: ignore[no-untyped-def]
        progress(0.1, "waiting")
        started = time.monotonic()
        pause.wait(cancel)
        return time.monotonic() - started

    with qtbot.waitSignal(runner.progress, timeout=30_000):
        runner.start("paused", work)
    qtbot.wait(400)
    with qtbot.waitSignal(runner.finished, timeout=5000) as blocker:
        pause.resume()
    assert blocker.args[1] >= 0.3  # it waited for the resume sent from here


def test_a_job_that_does_not_pickle_runs_here(qtbot, runner: JobRunner) -> None:
    lock = threading.Lock()  # a lock cannot go to another process

    def work(progress, cancel):  # type: ignore[no-untyped-def]
        with lock:
            return os.getpid()

    with qtbot.waitSignal(runner.finished, timeout=30_000) as blocker:
        runner.start("here", work)
    assert blocker.args[1] == os.getpid()
