"""What the Training tab hands to the core and says back: which data trains and validates,
where a run's checkpoints live, the core job for the compute setting, and the run's summary."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.cluster.connection import Compute
from studio.core.jobs import CancelToken, PauseToken, ProgressFn
from studio.core.models.data import DataSet, matching_training_split
from studio.core.models.loaded import LoadedModel
from studio.core.paths import cache_dir
from studio.core.train.finetune import FinetuneJob, holdout_split
from studio.core.train.types import (
    RESUMABLE_CHANGES,
    FinetuneResult,
    FinetuneSettings,
    TrainRecord,
)
from studio.ui import format as fmt


def training_split(data: DataSet) -> tuple[DataSet, DataSet, str]:
    """(training data, validation data, a sentence saying which is which) for ``data``.

    The demo's validation split trains on the demo's training split; any other data set is
    split 80/20 with a fixed shuffle, the 20 % held out for validation.
    """
    train = matching_training_split(data)
    if train is not None:
        return train, data, f"trains on {train.name} ({len(train):,}), validates on {data.name}"
    fit, held = holdout_split(data)
    return (
        fit,
        held,
        (
            f"trains on 80 % of {data.name} ({len(fit):,}), validates on the other 20 % "
            f"({len(held):,})"
        ),
    )


def session_split(data: DataSet, calibration: DataSet | None) -> tuple[DataSet, DataSet, str]:
    """:func:`training_split`, except for text data: it trains on its calibration split and
    validates on the validation split the session evaluates on (as ``studio finetune``)."""
    if calibration is None:
        return training_split(data)
    return (
        calibration,
        data,
        f"trains on the {len(calibration):,} sequences of {calibration.name}, validates on "
        f"the {len(data):,} of {data.name}",
    )


def quality_metric(student: LoadedModel, val: DataSet) -> str:
    """What the epoch records measure on the validation data (as FinetuneJob chooses)."""
    if student.task == "causal-lm":
        return "perplexity"
    if student.task == "embedding":
        return "cosine"
    return "accuracy" if val.labelled else "agreement"


def checkpoint_folder(
    student: LoadedModel,
    teacher: LoadedModel | None,
    train: DataSet,
    val: DataSet,
    settings: FinetuneSettings,
) -> Path:
    """The cache folder of a run: the same model, data and settings continue the same run."""
    kept = {k: v for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES}
    key = json.dumps(
        {
            "student": student.fingerprint(),
            "teacher": teacher.fingerprint() if teacher is not None else None,
            "train": train.fingerprint(),
            "val": val.fingerprint(),
            "settings": kept,
        },
        sort_keys=True,
    )
    root = cache_dir() / "finetune"
    root.mkdir(exist_ok=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def core_job(
    student: LoadedModel,
    train: DataSet,
    val: DataSet,
    settings: FinetuneSettings,
    teacher: LoadedModel | None,
    folder: Path,
    compute: Compute,
    progress: ProgressFn,
) -> FinetuneJob:
    """The core's job for the compute setting (made on the worker thread: Ray connects).

    On Ray it is data-parallel on Ray Train with the setting's workers (default: one per CPU
    of the cluster) and keeps no checkpoint folder; here it checkpoints into ``folder``.
    """
    if not compute.on_ray:
        return FinetuneJob(student, train, val, settings, teacher, checkpoint_dir=folder)
    from studio.core.cluster.connection import check_connection
    from studio.core.cluster.finetune import RayFinetuneJob

    assert compute.address is not None
    progress(0.0, f"connecting to Ray ({compute.address})")
    workers = compute.workers or max(1, int(check_connection(compute.address).cpus))
    return RayFinetuneJob(
        student, train, val, settings, teacher, address=compute.address, workers=workers
    )


@dataclass(frozen=True)
class RunStarted:
    """The first item of a training stream: where it runs, and the records of the checkpointed
    run it continues (small: the job itself stays in the job's process)."""

    where: str
    on_ray: bool
    history: list[TrainRecord] = field(default_factory=list)


@dataclass(frozen=True)
class RunBaseline:
    """Sent before the first record: the student's and the teacher's validation metrics."""

    before: dict[str, Any]
    teacher_metrics: dict[str, Any]


def training_stream(
    student: LoadedModel,
    train: DataSet,
    val: DataSet,
    settings: FinetuneSettings,
    teacher: LoadedModel | None,
    folder: Path,
    compute: Compute,
    pause: PauseToken,
    progress: ProgressFn,
    cancel: CancelToken,
) -> Iterator[Any]:
    """The Training tab's job: :class:`RunStarted`, :class:`RunBaseline`, then the run's
    :class:`TrainRecord` items; returns the :class:`FinetuneResult`."""
    job = core_job(student, train, val, settings, teacher, folder, compute, progress)
    yield RunStarted(getattr(job, "where", "this machine"), compute.on_ray, list(job.history))
    baseline_sent = False
    for record in job.run(progress, cancel, pause):
        if not baseline_sent:
            yield RunBaseline(dict(job.before), dict(job.teacher_metrics))
            baseline_sent = True
        yield record
    return job.result


def summary_text(result: FinetuneResult) -> str:
    """One line for the status: epochs, time, best epoch, quality before → after."""
    if result.perplexity_after is not None and result.perplexity_before is not None:
        quality = f"perplexity {result.perplexity_before:.4g} → {result.perplexity_after:.4g}"
    elif result.cosine_after is not None and result.cosine_before is not None:
        quality = f"cosine to the original {result.cosine_before:.4f} → {result.cosine_after:.4f}"
    elif result.accuracy_after is not None and result.accuracy_before is not None:
        quality = (
            f"accuracy {result.accuracy_before:.2%} → {result.accuracy_after:.2%} "
            f"({(result.accuracy_after - result.accuracy_before) * 100:+.2f} points)"
        )
    else:
        quality = f"agreement {fmt.percent(result.agreement_before, 2)} → "
        quality += fmt.percent(result.agreement_after, 2)
    text = (
        f"Fine-tuning done: {result.epochs_run} epoch(s) in {fmt.duration(result.seconds)}, "
        f"best epoch {result.best_epoch}; {quality}"
    )
    if result.teacher_accuracy is not None:
        text += f"; unpruned model {result.teacher_accuracy:.2%}"
    if result.stopped_early:
        text += "; stopped early"
    return text


def describe_record(
    record: TrainRecord, epochs: int, best: tuple | None, metric: str = "accuracy"
) -> str:
    """The status line while training: epoch, loss, learning rate, speed, best so far
    (``best``: the charts' (step, quality as plotted, epoch) of the best epoch)."""
    text = f"Epoch {record.epoch:.2f} of {epochs} · loss {record.loss:.4f}"
    text += f" · lr {record.lr:.2e} · {record.samples_per_s:,.0f} samples/s"
    if best is not None:
        percent = metric in ("accuracy", "agreement")
        value = f"{best[1]:.2f} %" if percent else f"{metric} {best[1]:.4g}"
        text += f" · best so far: epoch {best[2]:.0f}, {value}"
    return text
