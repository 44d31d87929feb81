"""The training loop every Ray Train worker runs for a :class:`RayFinetuneJob`.

Each worker takes the student, the teacher and the data from Ray's object store, wraps its
copy of the student in DistributedDataParallel (gloo on CPUs, NCCL on GPUs: the process group
Ray Train set up) and steps through :func:`studio.core.train.parts.train_step`, the step the
in-process :class:`~studio.core.train.finetune.FinetuneJob` takes.

Data: every epoch all workers draw the same shuffle (``FinetuneJob``'s seed and order); global
batch ``i`` is the same ``batch_size`` samples the in-process job would take, and worker ``r``
trains on the ``r``-th of ``world`` near-equal slices of it. Each worker's loss is weighted by
its slice's share, so the gradients DDP averages are those of the global batch's mean loss
and the learning rate means what it means in-process. Augmentation draws from a generator
seeded per epoch and rank. Batch norms see each worker's slice (they are not synchronised).

Control: between steps rank 0 reads the driver's flags (cancel, pause) from the channel actor
(at most every :data:`POLL_SECONDS`) and broadcasts one code to every rank, so all ranks stop or
pause at the same step; a pause keeps broadcasting every :data:`POLL_SECONDS` so no collective
waits long. Rank 0 validates after every epoch, picks the best epoch by ``FinetuneJob``'s rule,
and sends records, and at the end the best epoch's weights (CPU tensors), to the channel.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch
from torch import nn

from studio.core.models.evaluate import predict
from studio.core.train import checkpoint as ckpt
from studio.core.train.finetune import RECORDS_PER_EPOCH
from studio.core.train.parts import (
    better,
    capture_masks,
    epoch_record,
    make_optimizer,
    train_step,
    val_metrics,
    weight_sparsity,
)
from studio.core.train.schedule import augment, lr_factor
from studio.core.train.types import FinetuneSettings, TrainRecord

POLL_SECONDS = 0.1
GO, PAUSE, END, CANCEL = 0, 1, 2, 3  # END: early stopping (rank 0 decides)


class RunChannel:
    """A Ray actor between the driver and the workers: records and results one way, the
    cancel and pause flags the other. The driver takes what arrived with :meth:`take`."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.cancel = False
        self.paused = False

    def put(self, kind: str, value: Any) -> None:
        self.items.append((kind, value))

    def take(self) -> list[tuple[str, Any]]:
        items, self.items = self.items, []
        return items

    def set_flags(self, cancel: bool, paused: bool) -> None:
        self.cancel, self.paused = cancel, paused

    def flags(self) -> tuple[bool, bool]:
        return self.cancel, self.paused


class _Control:
    """The driver's flags, agreed on by every rank: rank 0 reads them, all ranks receive one
    code by broadcast."""

    def __init__(self, channel: Any, rank: int, world: int, device: torch.device) -> None:
        self.channel, self.rank, self.world, self.device = channel, rank, world, device
        self._flags = (False, False)
        self._read = 0.0

    def code(self, end: bool = False) -> int:
        """GO, END (rank 0's ``end``: early stopping) or CANCEL; waits out a pause."""
        while True:
            code = GO
            if self.rank == 0:
                cancel, paused = self._poll()
                code = CANCEL if cancel else END if end else PAUSE if paused else GO
            if self.world > 1:
                flag = torch.tensor([code], dtype=torch.int64, device=self.device)
                torch.distributed.broadcast(flag, src=0)
                code = int(flag.item())
            if code != PAUSE:
                return code
            if self.rank == 0:
                time.sleep(POLL_SECONDS)

    def _poll(self) -> tuple[bool, bool]:
        import ray

        now = time.monotonic()
        if now - self._read >= POLL_SECONDS or self._flags[1]:
            self._flags = ray.get(self.channel.flags.remote())
            self._read = now
        return self._flags


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: fine-tune this worker's share (see the module)."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    channel = config["channel"]
    torch.set_num_threads(int(config["threads"]))
    channel.put.remote("hello", (rank, socket.gethostname(), os.getpid()))
    device = ray.train.torch.get_device()
    s: FinetuneSettings = config["settings"]
    train, val = ray.get(config["train"]), ray.get(config["val"])
    module: nn.Module = ray.get(config["student"]).to(device)
    teacher = ray.get(config["teacher"]) if config["teacher"] is not None else None
    if teacher is not None:
        teacher = teacher.eval()
        teacher = teacher.to(device) if hasattr(teacher, "to") else teacher
        for p in getattr(teacher, "parameters", lambda: [])():
            p.requires_grad_(False)
    control = _Control(channel, rank, world, device)
    lead = _Lead(channel, module, val, teacher, device, config) if rank == 0 else None
    if control.code() == CANCEL:
        return
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net: nn.Module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    else:
        net = module
    masks = capture_masks(module)
    optimizer = make_optimizer(module, s)
    x_all = train.x.to(device)
    y_all = train.y.to(device) if train.y is not None else None
    background = float(train.x.min())
    steps_per_epoch = int(config["steps_per_epoch"])
    log_every = s.log_every_steps or max(1, steps_per_epoch // RECORDS_PER_EPOCH)
    step, stopped, lr = 0, False, s.learning_rate
    for epoch in range(s.epochs):
        code = control.code(end=stopped)
        if code == CANCEL:
            return
        if code == END:
            break
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_seed(s, epoch)))
        generator = torch.Generator().manual_seed(_seed(s, epoch) * 1_009 + rank)
        module.train()
        window = torch.zeros(3, dtype=torch.float64)  # loss * samples, samples, seconds
        for i in range(steps_per_epoch):
            if i and control.code() == CANCEL:
                return
            tick = time.perf_counter()
            batch = order[i * s.batch_size : (i + 1) * s.batch_size]
            idx = torch.tensor_split(batch, world)[rank].to(device)
            xb = augment(x_all[idx], s, generator, background)
            yb = y_all[idx] if y_all is not None else None
            lr = s.learning_rate * lr_factor(s, step, steps_per_epoch)
            share = len(idx) * world / len(batch)
            loss = train_step(module, teacher, optimizer, masks, xb, yb, lr, s, net, share)
            step += 1
            window += torch.tensor(
                [float(loss) * len(idx), len(idx), time.perf_counter() - tick], dtype=torch.float64
            )
            if (i + 1) % log_every == 0 or i == steps_per_epoch - 1:
                totals = _sum_over_ranks(window[:2], world, device)
                if lead is not None:
                    seconds = max(float(window[2]), 1e-9)
                    lead.step_record(step, epoch + (i + 1) / steps_per_epoch, totals, lr, seconds)
                window.zero_()
        if lead is not None:
            stopped = lead.epoch_end(step, epoch, lr)
    if lead is not None:
        lead.finish(stopped)


class _Lead:
    """Rank 0's part: validation, the best epoch, and what goes back to the driver."""

    def __init__(
        self,
        channel: Any,
        module: nn.Module,
        val: Any,
        teacher: Any,
        device: torch.device,
        config: dict[str, Any],
    ) -> None:
        self.channel, self.module, self.val, self.device = channel, module, val, device
        self.settings: FinetuneSettings = config["settings"]
        self.metric: str = config["metric"]
        self.history: list[TrainRecord] = []
        self.best: dict[str, Any] | None = None
        self.stale = 0
        self.val_ref = predict(teacher, val, device=device) if teacher is not None else None
        teacher_metrics = (
            val_metrics(self.val_ref, val, None)
            if self.val_ref is not None and val.labelled
            else {}
        )
        before = self.evaluate()
        channel.put.remote("start", {"before": before, "teacher_metrics": teacher_metrics})

    def evaluate(self) -> dict[str, float | None]:
        logits = predict(self.module, self.val, device=self.device)
        self.module.train()
        return val_metrics(logits, self.val, self.val_ref)

    def step_record(
        self, step: int, epoch: float, totals: torch.Tensor, lr: float, seconds: float
    ) -> None:
        loss_sum, samples = float(totals[0]), float(totals[1])
        record = TrainRecord(
            "step",
            step,
            round(epoch, 6),
            loss_sum / max(1.0, samples),
            lr,
            weight_sparsity(self.module),
            samples / seconds,
        )
        self._send(record)

    def epoch_end(self, step: int, epoch: int, lr: float) -> bool:
        """Validate, keep the best epoch, send the epoch's record; True to stop early."""
        metrics = self.evaluate()
        is_best = self.best is None or better(metrics, self.best["metrics"], self.metric)
        if is_best:
            state = ckpt.model_state(self.module)
            self.best = {"epoch": epoch + 1, "metrics": metrics, "model": state}
            self.stale = 0
        else:
            self.stale += 1
        patience = self.settings.early_stopping_patience
        record = epoch_record(self.history, step, epoch, lr, self.module, metrics, is_best)
        self._send(record)
        return bool(patience and self.stale >= patience)

    def finish(self, stopped: bool) -> None:
        """The best epoch's weights to the driver; waits until the channel has them (and so
        every record sent before: one caller's calls run in order)."""
        import ray

        ray.get(self.channel.put.remote("end", {"best": self.best, "stopped": stopped}))

    def _send(self, record: TrainRecord) -> None:
        self.history.append(record)
        self.channel.put.remote("record", record.to_dict())


def _seed(settings: FinetuneSettings, epoch: int) -> int:
    return settings.seed * 100_003 + epoch  # FinetuneJob's shuffle seed


def _sum_over_ranks(values: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    if world == 1:
        return values
    total = values.to(device)
    torch.distributed.all_reduce(total)
    return total.cpu()
