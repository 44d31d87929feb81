"""Fine-tuning on Ray Train (2 workers on one local Ray instance shared by the module's tests):
records stream while the workers train, the result is the best epoch's weights in a copy of
the student, pause holds every worker and cancel ends the run in seconds, a lost worker ends
it with one line, and what Ray cannot do yet (or without Ray at all) is refused clearly."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import torch

from studio.core.cluster.connection import INSTALL_HINT, Cluster
from studio.core.cluster.finetune import RayFinetuneJob
from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, PauseToken
from studio.core.models.data import demo_splits
from studio.core.models.evaluate import evaluate
from studio.core.models.load import load_model
from studio.core.plan.plan import PruningPlan
from studio.core.train.finetune import FinetuneSettings, GradualSchedule

pytest.importorskip("ray")  # the test command installs the [ray] extra

FAST = {"batch_size": 32, "warmup_epochs": 0.0, "log_every_steps": 1}


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster.connect("local")
    yield cluster
    Cluster.shutdown()


@pytest.fixture(scope="module")
def data():
    train, val = demo_splits()
    return train.subset(192), val.subset(96)


def cpus_free(seconds: float = 15.0) -> bool:
    """Whether every CPU of the local instance is free again (the workers are gone)."""
    import ray

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


def test_records_stream_and_the_result_is_the_best_epoch(cluster, data) -> None:
    train, val = data
    student = load_model("demo")
    before = {k: v.clone() for k, v in student.module.state_dict().items()}
    settings = FinetuneSettings(epochs=2, **FAST)
    job = RayFinetuneJob(student, train, val, settings, load_model("demo"), workers=2)
    assert "local Ray" in job.where and "2 training workers" in job.where
    assert job.steps_per_epoch == 6 and job.total_steps == 12
    arrivals = []
    for record in job.run():
        arrivals.append((time.monotonic(), record))
    steps = [r for _, r in arrivals if r.kind == "step"]
    epochs = [r for _, r in arrivals if r.kind == "epoch"]
    assert [r.step for r in steps] == list(range(1, 13)) and len(epochs) == 2
    # yielded as the workers send them, not all at the end
    assert arrivals[-1][0] - arrivals[0][0] > 0.5
    result = job.result
    assert result is not None and result.epochs_run == 2 and job.history == result.history
    best = max(epochs, key=lambda r: (r.val_accuracy, -r.val_loss))
    assert result.best_epoch == int(best.epoch) and best.is_best
    assert result.accuracy_after == pytest.approx(best.val_accuracy)
    assert result.teacher_accuracy == job.teacher_metrics["accuracy"] > 0.9
    assert result.accuracy_before == job.before["accuracy"]
    measured = evaluate(result.model.module, val)
    assert measured.accuracy == pytest.approx(best.val_accuracy, abs=1e-6)
    assert result.model.module is not student.module
    for key, tensor in student.module.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    assert cpus_free()


def test_pause_holds_every_worker_and_cancel_ends_the_run(cluster, data) -> None:
    train, val = data
    settings = FinetuneSettings(epochs=50, **FAST)
    job = RayFinetuneJob(load_model("demo"), train, val, settings, workers=2)
    cancel, pause = CancelToken(), PauseToken()
    times: list[float] = []
    paused_at = resumed_at = cancelled_at = 0.0

    def resume() -> None:
        nonlocal resumed_at
        resumed_at = time.monotonic()
        pause.resume()

    with pytest.raises(Cancelled):
        for record in job.run(cancel=cancel, pause=pause):
            times.append(time.monotonic())
            if len(times) == 2:
                paused_at = time.monotonic()
                pause.pause()
                threading.Timer(2.5, resume).start()
            if resumed_at and not cancelled_at and record.step >= 6:
                cancelled_at = time.monotonic()
                cancel.cancel()
    ended = time.monotonic()
    # records sent before the flag reached the workers may come in the first moments
    assert not [t for t in times if paused_at + 0.7 < t < resumed_at]
    assert any(t > resumed_at for t in times)
    assert cancelled_at and ended - cancelled_at < 5.0
    assert job.result is None
    assert cpus_free()


def test_a_lost_worker_ends_the_job_with_one_line(cluster, data) -> None:
    train, val = data
    job = RayFinetuneJob(load_model("demo"), train, val, FinetuneSettings(epochs=50, **FAST),
                         workers=2)  # fmt: skip
    with pytest.raises(StudioError) as caught:
        for record in job.run():
            if record.step == 2:
                pid = next(pid for rank, _, pid in job.worker_pids if rank == 1)
                os.kill(pid, signal.SIGKILL)
    message = str(caught.value)
    assert message.startswith("a Ray worker was lost: ") and "\n" not in message
    assert not isinstance(caught.value, Cancelled)
    assert cpus_free()


def test_what_ray_cannot_do_is_refused(data) -> None:
    train, val = data
    student = load_model("demo")
    plan = PruningPlan("structured", ratios={"conv1": 0.5})
    cases = [
        ({"gradual": GradualSchedule(plan, 2)}, "gradual pruning does not run on Ray"),
        ({"checkpoint_dir": "ck"}, "keeps no checkpoint folder"),
        ({"workers": 0}, "workers must be 1 or more"),
        ({"workers": 3, "settings": FinetuneSettings(batch_size=4)}, "use a batch size of 6"),
    ]
    for kwargs, message in cases:
        with pytest.raises(StudioError, match=message):
            RayFinetuneJob(student, train, val, **kwargs)


def test_more_workers_than_the_cluster_has_cpus_is_refused(cluster, data) -> None:
    train, val = data
    cpus = int(cluster.info.cpus)
    settings = FinetuneSettings(batch_size=2 * (cpus + 1))
    message = f"has {cpus} CPUs, too few for {cpus + 1} workers of 1 CPU each"
    with pytest.raises(StudioError, match=message):
        RayFinetuneJob(load_model("demo"), train, val, settings, workers=cpus + 1)


def test_without_ray_the_error_names_the_install_command(data, monkeypatch) -> None:
    train, val = data
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(StudioError) as caught:
        RayFinetuneJob(load_model("demo"), train, val, address="local", workers=2)
    assert "Ray is not installed" in str(caught.value) and INSTALL_HINT in str(caught.value)
