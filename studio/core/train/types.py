"""Values of the training engine: its settings, the records it yields, and its result.

:class:`FinetuneSettings` is frozen and validated on creation (one-line errors), so the CLI
and the GUI can build it from user input and show the message as it is.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from studio.core.errors import StudioError
from studio.core.models.loaded import LoadedModel

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("shift", "none")
DEVICES = ("auto", "cpu", "cuda")
# settings that may differ when a run continues from its checkpoint (they change nothing
# in what the remaining epochs compute)
RESUMABLE_CHANGES = ("early_stopping_patience", "log_every_steps", "device", "threads")


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune. ``lr=None`` takes the optimizer's default (SGD 0.01, AdamW 0.001).

    The defaults recover the demo's 50%-MACs structured plan to within a point of the
    unpruned accuracy in a few CPU minutes (see :mod:`studio.core.train.finetune`).
    """

    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    schedule: str = "cosine"
    step_size: int = 2  # step schedule: epochs between decays
    gamma: float = 0.3  # step schedule: factor at each decay
    augment: str = "shift"
    shift_pixels: int = 2
    flips: bool = False  # horizontal flips change digits and text: off unless asked for
    distill_temperature: float = 4.0
    distill_weight: float = 0.7  # weight of the distillation term; 0 = labels only
    early_stopping_patience: int | None = None
    seed: int = 0
    device: str = "auto"
    log_every_steps: int | None = None  # None: about 12 step records per epoch
    threads: int | None = None  # CPU threads for torch (None: every core)

    # language models: AdamW at a small rate, batches of sequences, distillation at T=1
    # (the teacher's next-token distribution itself), no image augmentation
    TEXT_DEFAULTS: ClassVar[dict[str, Any]] = {
        "optimizer": "adamw",
        "lr": 3e-4,
        "batch_size": 16,
        "weight_decay": 0.01,
        "augment": "none",
        "distill_temperature": 1.0,
        "distill_weight": 0.5,
        "epochs": 3,
    }

    @classmethod
    def for_text(cls, **given: Any) -> FinetuneSettings:
        """Settings for a transformer on text: TEXT_DEFAULTS where ``given`` says nothing."""
        return cls(**{**cls.TEXT_DEFAULTS, **given})

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise StudioError(message)

        need(_int(self.epochs) and self.epochs >= 1, f"epochs must be 1 or more, not {self.epochs}")
        need(
            _int(self.batch_size) and self.batch_size >= 1,
            f"batch size must be 1 or more, not {self.batch_size}",
        )
        need(
            self.optimizer in OPTIMIZERS,
            f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}",
        )
        need(
            self.lr is None or (_num(self.lr) and 0 < self.lr <= 10),
            f"learning rate must be a number in (0, 10], not {self.lr}",
        )
        need(_num(self.momentum) and 0 <= self.momentum < 1, "momentum must be in [0, 1)")
        need(
            _num(self.weight_decay) and 0 <= self.weight_decay < 1,
            "weight decay must be in [0, 1)",
        )
        need(
            _num(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
            f"warm-up must be between 0 and the {self.epochs} epochs, not {self.warmup_epochs}",
        )
        need(
            self.schedule in SCHEDULES,
            f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}",
        )
        need(_int(self.step_size) and self.step_size >= 1, "step size must be 1 epoch or more")
        need(_num(self.gamma) and 0 < self.gamma <= 1, "gamma must be in (0, 1]")
        need(
            self.augment in AUGMENTS,
            f"unknown augmentation {self.augment!r}: choose one of {', '.join(AUGMENTS)}",
        )
        need(_int(self.shift_pixels) and 0 <= self.shift_pixels <= 8, "shift must be 0-8 pixels")
        need(
            _num(self.distill_temperature) and 0 < self.distill_temperature <= 100,
            f"distillation temperature must be in (0, 100], not {self.distill_temperature}",
        )
        need(
            _num(self.distill_weight) and 0 <= self.distill_weight <= 1,
            f"distillation weight must be between 0 and 1, not {self.distill_weight}",
        )
        need(
            self.early_stopping_patience is None
            or (_int(self.early_stopping_patience) and self.early_stopping_patience >= 1),
            "early-stopping patience must be 1 epoch or more",
        )
        need(self.device in DEVICES, f"unknown device {self.device!r}: choose auto, cpu or cuda")
        need(
            self.log_every_steps is None
            or (_int(self.log_every_steps) and self.log_every_steps >= 1),
            "log_every_steps must be 1 or more",
        )
        need(
            self.threads is None or (_int(self.threads) and self.threads >= 1),
            f"threads must be 1 or more, not {self.threads}",
        )

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.01 if self.optimizer == "sgd" else 0.001

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Names of the settings that differ from ``other`` (a :meth:`to_dict`), except
        those a continued run may change."""
        mine = self.to_dict()
        return [
            f.name
            for f in fields(self)
            if f.name not in RESUMABLE_CHANGES and other.get(f.name) != mine[f.name]
        ]


@dataclass(frozen=True)
class TrainRecord:
    """One point of the live charts: a training step (``kind="step"``) or an epoch's end.

    ``epoch`` is training progress in epochs (1.25 = a quarter into the second epoch);
    ``loss`` is the mean training loss since the previous record. Epoch records carry the
    validation metrics: ``val_accuracy``/``val_loss`` on labelled data, ``agreement``
    (top-1 agreement with the teacher) whenever a teacher is given.
    """

    kind: str
    step: int
    epoch: float
    loss: float
    lr: float
    sparsity: float
    samples_per_s: float
    val_accuracy: float | None = None
    val_loss: float | None = None
    agreement: float | None = None
    is_best: bool = False
    ratio_scale: float | None = None  # gradual pruning: fraction of the final plan applied
    perplexity: float | None = None  # language models: validation perplexity
    cosine: float | None = None  # encoders: cosine of the embedding to the teacher's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class FinetuneResult:
    """The recovered model (the best epoch's weights, in eval mode, on the CPU) and the run."""

    model: LoadedModel
    epochs_run: int
    best_epoch: int
    accuracy_before: float | None
    accuracy_after: float | None
    agreement_before: float | None
    agreement_after: float | None
    loss_before: float | None
    loss_after: float | None
    seconds: float
    sparsity: float
    params: int
    history: list[TrainRecord] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int = 0  # epochs already done in the checkpoint this run continued
    teacher_accuracy: float | None = None  # the teacher on the labelled validation data
    perplexity_before: float | None = None  # language models
    perplexity_after: float | None = None
    cosine_before: float | None = None  # encoders: cosine of the embedding to the teacher's
    cosine_after: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no module, no history)."""
        return {
            "model": self.model.name,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "agreement_before": self.agreement_before,
            "agreement_after": self.agreement_after,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "seconds": round(self.seconds, 3),
            "sparsity": self.sparsity,
            "params": self.params,
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
            "teacher_accuracy": self.teacher_accuracy,
            "perplexity_before": self.perplexity_before,
            "perplexity_after": self.perplexity_after,
            "cosine_before": self.cosine_before,
            "cosine_after": self.cosine_after,
            "notes": list(self.notes),
        }


def history_csv(records: list[TrainRecord]) -> str:
    """The records as CSV, one row each, every field a column (empty where not measured)."""
    out = io.StringIO()
    names = [f.name for f in fields(TrainRecord)]
    writer = csv.writer(out)
    writer.writerow(names)
    for record in records:
        values = record.to_dict()
        writer.writerow(["" if values[n] is None else values[n] for n in names])
    return out.getvalue()


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
