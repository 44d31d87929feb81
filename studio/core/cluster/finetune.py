"""Data-parallel fine-tuning on Ray: :class:`RayFinetuneJob`, a :class:`FinetuneJob` whose
epochs run on Ray Train workers (``TorchTrainer``, DDP: gloo on CPUs, NCCL on GPUs).

It is made and used like :class:`FinetuneJob`: :meth:`RayFinetuneJob.run` yields the same
:class:`TrainRecord` values while training runs (the live charts) and sets ``result``, whose
model is a copy of the student with the best epoch's weights. The loss, optimizer, schedule,
augmentation, distillation and zero-masks are the in-process job's (one training step,
:func:`studio.core.train.parts.train_step`; the worker's loop is in
:mod:`studio.core.cluster.finetune_worker`).

``settings.batch_size`` is the *global* batch: each step the workers split the batch the
in-process job would take (the same shuffle) into near-equal slices, so the learning rate and
the number of steps mean what they mean in-process, whatever the number of workers. A last
partial batch too small to give every worker 2 samples is left out of the epoch (the
in-process job leaves out a last batch of 1). Batch norms see one worker's slice.

How it runs: the student module (pickled as it is, pruned shapes included), the teacher and
the data go into Ray's object store once. A Ray task on the cluster runs the trainer, with
Ray Train's run folder in a temporary folder of that node, removed afterwards; the driver needs
no shared filesystem. A small actor (:class:`~studio.core.cluster.finetune_worker.RunChannel`)
carries records and the best epoch's weights (CPU tensors) from rank 0 to the driver, and the
cancel and pause flags to the workers, which all stop or pause at the same step. Cancel ends
the run at the next step and raises :class:`Cancelled`; if the workers do not stop within
:data:`CANCEL_GRACE_SECONDS` the task is killed, and the trainer with it. A lost worker or
connection ends the job with one line. Gradual pruning and checkpoint folders are refused
(they run in-process only).

Measured on the demo pruned to half its MACs (``studio prune --model demo --data demo
--calib-data demo:train --target-macs 0.5 --allocate uniform``: 83.33%), 5 epochs with the
default settings and ``--teacher demo``, on the shared 2-core box (load average 5-9, 2026-11):
``--ray local --workers 2`` 99.17% (best epoch 4) in 82 s of run time, 105 s wall (Ray's
start included); in-process with ``--threads 1`` 99.44% (best epoch 3) in 61 s, 68 s wall.
Two workers on two shared cores are not faster: Ray Train's start-up (the trainer's process,
its controller and workers, the process group: about 20 s here) and the gradient all-reduce
cost more than the second core gives.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.core.cluster.connection import LOCAL, Cluster, require_ray
from studio.core.cluster.finetune_worker import RunChannel, train_loop
from studio.core.errors import Cancelled, StudioError, first_line
from studio.core.jobs import CancelToken, PauseToken, ProgressFn, check, report
from studio.core.models.data import DataSet
from studio.core.models.loaded import LoadedModel
from studio.core.train.finetune import FinetuneJob
from studio.core.train.schedule import GradualSchedule
from studio.core.train.types import FinetuneSettings, TrainRecord

POLL_SECONDS = 0.1  # how often the driver takes records and passes on cancel/pause
CANCEL_GRACE_SECONDS = 10.0  # then the trainer's task is killed
# Ray Train settings for the task that runs the trainer: no metrics export, no print patching,
# and a quick look at the workers (a lost worker is noticed within about a second)
TRAIN_ENV = {
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
}
LOST_MARKS = ("health check", "died", "connection closed", "connection reset", "unexpectedly")


class RayFinetuneJob(FinetuneJob):
    """:class:`FinetuneJob` on ``workers`` Ray Train workers of the cluster at ``address``
    (``local``, ``auto``, ``ray://HOST:PORT`` or ``HOST:PORT``; see
    :mod:`studio.core.cluster.connection`).

    Connects on creation; ``where`` says where the job runs. Each worker uses
    ``settings.threads`` CPU threads (default: the cluster's CPUs shared out among the
    workers); with GPUs in the cluster (and ``device`` not ``cpu``) each worker takes one.
    """

    def __init__(
        self,
        student: LoadedModel,
        train: DataSet,
        val: DataSet,
        settings: FinetuneSettings | None = None,
        teacher: LoadedModel | None = None,
        checkpoint_dir: Path | str | None = None,
        gradual: GradualSchedule | None = None,
        address: str = LOCAL,
        workers: int = 1,
    ) -> None:
        if gradual is not None:
            raise StudioError("gradual pruning does not run on Ray yet: run it without Ray")
        if checkpoint_dir is not None:
            raise StudioError(
                "fine-tuning on Ray keeps no checkpoint folder yet: run without Ray to keep "
                "checkpoints and continue a run"
            )
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise StudioError(f"workers must be 1 or more, not {workers}")
        settings = settings or FinetuneSettings()
        if settings.batch_size < 2 * workers:
            raise StudioError(
                f"a batch of {settings.batch_size} split among {workers} workers leaves fewer "
                f"than 2 samples each: use a batch size of {2 * workers} or more"
            )
        super().__init__(student, train, val, settings, teacher)
        self.workers = workers
        batch = settings.batch_size
        self.steps_per_epoch = len(train) // batch + (1 if len(train) % batch >= 2 * workers else 0)
        self.total_steps = self.steps_per_epoch * settings.epochs
        cluster = Cluster.connect(address)
        info = cluster.refresh()
        self.address = cluster.address
        self.use_gpu = settings.device != "cpu" and info.gpus >= 1
        if settings.device == "cuda" and info.gpus < 1:
            raise StudioError("CUDA was asked for but the Ray cluster has no GPUs")
        if self.use_gpu and info.gpus < workers:
            raise StudioError(
                f"the Ray cluster has {info.gpus:g} GPUs for {workers} workers: use "
                f"{int(info.gpus)} workers or device cpu"
            )
        largest = max((n.cpus for n in info.nodes if n.alive), default=1.0)
        self.cpus_per_worker = settings.threads or max(1, int(min(info.cpus / workers, largest)))
        if workers * self.cpus_per_worker > info.cpus:
            raise StudioError(
                f"the Ray cluster has {info.cpus:g} CPUs, too few for {workers} workers of "
                f"{self.cpus_per_worker} CPU{'s' if self.cpus_per_worker != 1 else ''} each: "
                "use fewer workers (or threads)"
            )
        self.where = f"{info.where()}; {workers} training worker{'s' if workers != 1 else ''}"
        self.worker_pids: list[tuple[int, str, int]] = []  # (rank, host, pid) as they start

    def run(
        self,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
        pause: PauseToken | None = None,
    ) -> Iterator[TrainRecord]:
        """Train on the cluster, yielding step and epoch records as they arrive; ``result``
        is set at the end."""
        ray = require_ray()
        started = time.monotonic()
        self.result, self.history, self.worker_pids = None, [], []
        self.before, self.teacher_metrics = {}, {}
        report(progress, 0.0, "starting Ray workers")
        check(cancel)
        teacher = copy.deepcopy(self.teacher.module).eval() if self.teacher else None
        self._check_outputs(copy.deepcopy(self.student.module).cpu(), teacher, self.train.x[:2])
        config = self._loop_config(ray)
        try:
            channel = ray.remote(RunChannel).options(num_cpus=0).remote()
            task = ray.remote(_fit).options(num_cpus=0, max_retries=0)
            fit = task.remote(dict(config, channel=channel), self.workers, self.use_gpu,
                              self.cpus_per_worker)  # fmt: skip
        except Exception as exc:
            raise StudioError(
                f"lost the connection to Ray at {self.address}: {first_line(exc)}"
            ) from None
        end: dict[str, Any] | None = None
        done = False  # the task has ended (or was killed): nothing left to stop
        try:
            sent = (False, False)
            cancelled_at: float | None = None
            while not done:
                done = bool(ray.wait([fit], timeout=POLL_SECONDS)[0])
                for kind, value in ray.get(channel.take.remote()):
                    end = value if kind == "end" else end
                    record = self._take(kind, value)
                    if record is not None:
                        report(
                            progress, record.step / self.total_steps, f"epoch {record.epoch:.2f}"
                        )
                        yield record
                flags = (bool(cancel and cancel.cancelled), bool(pause and pause.paused))
                if flags != sent:
                    channel.set_flags.remote(*flags)
                    sent = flags
                if flags[0] and not done:
                    cancelled_at = cancelled_at or time.monotonic()
                    if time.monotonic() - cancelled_at > CANCEL_GRACE_SECONDS:
                        ray.cancel(fit, force=True)  # the workers did not stop: end them
                        done = True
                        raise Cancelled()
            status, message = ray.get(fit)
        except StudioError:
            raise
        except Exception as exc:  # the driver's connection, or the task's process
            check(cancel)  # killed on purpose
            raise StudioError(f"a Ray worker was lost: {first_line(exc)}") from None
        finally:
            _stop(ray, fit, channel, done)
        check(cancel)
        if status == "studio":
            raise StudioError(message)
        if status == "lost":
            raise StudioError(f"a Ray worker was lost: {message}")
        if status != "ok" or end is None:
            raise StudioError(f"fine-tuning on Ray failed: {message or 'no result came back'}")
        self.result = self._finish(end["best"], bool(end["stopped"]), time.monotonic() - started)
        report(progress, 1.0, "done")

    # ---- pieces -------------------------------------------------------------------------

    def _loop_config(self, ray: Any) -> dict[str, Any]:
        """What every worker gets: object-store references to the model and the data."""
        refs = {}
        for key, value in (
            ("student", self.student.module),
            ("teacher", self.teacher.module if self.teacher else None),
            ("train", self.train),
            ("val", self.val),
        ):
            try:
                refs[key] = ray.put(value) if value is not None else None
            except Exception as exc:  # a module that does not pickle (hooks, lambdas, ...)
                what = {"student": self.student.name, "train": self.train.name,
                        "val": self.val.name}.get(key, "the teacher")  # fmt: skip
                raise StudioError(
                    f"cannot send {what} to the Ray workers: {first_line(exc)}"
                ) from None
        return dict(
            refs,
            settings=self.settings,
            steps_per_epoch=self.steps_per_epoch,
            metric=self.metric,
            threads=self.cpus_per_worker,
        )

    def _take(self, kind: str, value: Any) -> TrainRecord | None:
        """One item from the workers: a record to yield, or state to keep."""
        if kind == "hello":
            self.worker_pids.append(tuple(value))
        elif kind == "start":
            self.before = dict(value["before"])
            self.teacher_metrics = dict(value["teacher_metrics"])
        elif kind == "record":
            record = TrainRecord.from_dict(value)
            self.history.append(record)
            return record
        return None


def _fit(config: dict[str, Any], workers: int, use_gpu: bool, cpus: int) -> tuple[str, str]:
    """A Ray task on the cluster: Ray Train's TorchTrainer over ``train_loop``. Returns
    ``(status, message)``: ok, studio (a StudioError on a worker), lost or error."""
    import os

    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    folder = tempfile.mkdtemp(prefix="studio-ray-train-")
    resources = {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name="studio-finetune",
                storage_path=folder,
                failure_config=FailureConfig(max_failures=0),
                logging_config=LoggingConfig(log_level="ERROR"),
            ),
        )
        trainer.fit()
        return "ok", ""
    except Exception as exc:
        return _failure(exc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _failure(exc: BaseException) -> tuple[str, str]:
    """Ray Train's error as (status, one line): a StudioError raised on a worker keeps its
    message; a worker whose process died, or whose peers lost it, is 'lost'."""
    failures: dict[Any, BaseException] = dict(getattr(exc, "worker_failures", None) or {})
    if not failures:
        failures = {None: getattr(exc, "controller_failure", exc)}
    bases = {rank: getattr(e, "_base_exc", e) for rank, e in failures.items()}
    for base in bases.values():
        if isinstance(base, StudioError):
            return "studio", str(base)
    for rank, error in failures.items():
        if type(error).__name__.startswith("WorkerHealthCheck"):
            return "lost", f"worker {rank} stopped responding ({_clean(error)})"
    for rank, base in bases.items():
        if any(mark in f"{type(base).__name__} {base}".lower() for mark in LOST_MARKS):
            return "lost", f"worker {rank}: {_clean(base)}"
    rank, base = next(iter(bases.items()))
    return "error", f"worker {rank}: {type(base).__name__}: {_clean(base)}"


def _clean(exc: BaseException) -> str:
    """The first line of an error without gloo's source location and advice."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc))
    return text.split(". This is typically")[0].rstrip(".")


def _stop(ray: Any, fit: Any, channel: Any, done: bool) -> None:
    """End the trainer if it still runs (cancel, a closed generator, an error), then the
    channel. Quietly: the connection may be gone."""
    try:
        if not done:
            channel.set_flags.remote(True, False)
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            while not ray.wait([fit], timeout=POLL_SECONDS)[0]:
                if time.monotonic() > deadline:
                    ray.cancel(fit, force=True)
                    break
        ray.kill(channel)
    except Exception:
        pass
