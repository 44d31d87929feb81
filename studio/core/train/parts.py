"""Pieces of the training loop: the optimizer, the loss (labels blended with distillation),
one optimizer step, validation metrics, the masks that keep pruned weights at zero, weight
sparsity, and a held-out validation split. The in-process loop (:mod:`studio.core.train.finetune`)
and the Ray workers' loop (:mod:`studio.core.cluster.finetune_worker`) both step through
:func:`train_step`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import StudioError
from studio.core.models.data import DataSet
from studio.core.models.evaluate import fidelity
from studio.core.models.memory_format import standard_layout
from studio.core.train.types import FinetuneSettings, TrainRecord


def make_optimizer(module: nn.Module, settings: FinetuneSettings) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW; weight decay on weights (2-D or more), not on biases and
    normalisation parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.learning_rate)
    return torch.optim.SGD(groups, lr=settings.learning_rate, momentum=settings.momentum)


def val_metrics(
    logits: torch.Tensor, val: DataSet, reference: torch.Tensor | None
) -> dict[str, float | None]:
    """Accuracy and cross-entropy on labelled ``val``; top-1 agreement with the teacher's
    ``reference`` outputs (and, without labels, the KL divergence from them as the loss)."""
    out: dict[str, float | None] = {"accuracy": None, "loss": None, "agreement": None}
    if val.y is not None:
        if logits.shape[1] <= int(val.y.max()):
            raise StudioError(
                f"the model has {logits.shape[1]} outputs but {val.name} has labels "
                f"up to {int(val.y.max())}"
            )
        out["accuracy"] = float((logits.argmax(1) == val.y).float().mean())
        out["loss"] = float(F.cross_entropy(logits, val.y))
    if reference is not None:
        fid = fidelity(logits, reference)
        out["agreement"] = fid["agreement"]
        out["cosine"] = fid["cosine"]
        if val.y is None:
            out["loss"] = fid["kl"]
    return out


def training_loss(
    out: torch.Tensor,
    labels: torch.Tensor | None,
    reference: torch.Tensor | None,
    settings: FinetuneSettings,
) -> torch.Tensor:
    """``(1 - w) * CE(out, labels) + w * T^2 * KL(softmax(reference/T) || softmax(out/T))``
    with ``w = distill_weight``: labels only without a reference, distillation only without
    labels (Hinton et al., 2015; the T^2 keeps the gradients' scale as T changes)."""
    weight = settings.distill_weight if reference is not None else 0.0
    if labels is None:
        if reference is None:
            raise StudioError("unlabeled data can only be trained on with a teacher")
        weight = 1.0
    loss = out.new_zeros(())
    if weight < 1.0:
        assert labels is not None
        loss = loss + (1.0 - weight) * F.cross_entropy(out, labels)
    if weight > 0.0:
        assert reference is not None
        t = settings.distill_temperature
        kd = F.kl_div(
            F.log_softmax(out / t, 1),
            F.log_softmax(reference / t, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + weight * t * t * kd
    return loss


def batch_loss(
    forward: Callable[[torch.Tensor], Any],
    teacher: nn.Module | None,
    xb: torch.Tensor,
    yb: torch.Tensor | None,
    settings: FinetuneSettings,
) -> torch.Tensor:
    """:func:`training_loss` of the model (``forward``) on one batch, with the teacher's
    outputs as the reference when there is a teacher."""
    task = getattr(forward, "studio_task", None)
    if task in ("causal-lm", "embedding"):
        return text_loss(forward, teacher, xb, settings, task)
    xb = standard_layout(xb)  # never NHWC by accident: see studio.core.models.memory_format
    out = logits_of(forward(xb))
    if teacher is None:
        return training_loss(out, yb, None, settings)
    with torch.no_grad():
        ref = logits_of(teacher(xb))
    return training_loss(out, yb, ref, settings)


def text_loss(
    forward: Callable[[torch.Tensor], Any],
    teacher: nn.Module | None,
    ids: torch.Tensor,
    settings: FinetuneSettings,
    task: str,
) -> torch.Tensor:
    """A causal LM: ``(1 - w) * CE(next token) + w * T^2 * KL(teacher || student)`` per
    predicted position (w = distill_weight with a teacher, else 0). An encoder: ``1 - cosine``
    of its pooled embedding to the teacher's (there is nothing else to learn from)."""
    out = forward(ids).float()
    if task == "embedding":
        if teacher is None:
            raise StudioError("an encoder is fine-tuned by distillation: give a teacher")
        with torch.no_grad():
            ref = teacher(ids).float()
        return (1.0 - F.cosine_similarity(out, ref, dim=-1)).mean()
    logits = out[:, :-1]
    vocab = logits.shape[-1]
    weight = settings.distill_weight if teacher is not None else 0.0
    loss = logits.new_zeros(())
    if weight < 1.0:
        target = ids[:, 1:].reshape(-1)
        loss = loss + (1.0 - weight) * F.cross_entropy(logits.reshape(-1, vocab), target)
    if weight > 0.0:
        assert teacher is not None
        with torch.no_grad():
            ref = teacher(ids).float()[:, :-1]
        t = settings.distill_temperature
        kd = F.kl_div(
            F.log_softmax(logits.reshape(-1, vocab) / t, -1),
            F.log_softmax(ref.reshape(-1, vocab) / t, -1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + weight * t * t * kd
    return loss


def train_step(
    module: nn.Module,
    teacher: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    masks: dict[str, torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor | None,
    lr: float,
    settings: FinetuneSettings,
    forward: Callable[[torch.Tensor], Any] | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """One optimizer step of ``module`` at learning rate ``lr``; returns the batch's loss.

    Masked weights get no gradient and are zeroed again after the step. ``forward`` runs
    the model (default ``module`` itself; a data-parallel wrapper of it on Ray workers) and
    ``weight`` scales the loss before the backward pass (a worker's share of the global batch,
    so the averaged gradients are those of the global batch's mean loss).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = batch_loss(forward or module, teacher, xb, yb, settings)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
    apply_masks(module, masks, grads=True)
    optimizer.step()
    apply_masks(module, masks)
    return loss.detach()


def holdout_split(data: DataSet, fraction: float = 0.2, seed: int = 0) -> tuple[DataSet, DataSet]:
    """``data`` split into training and a held-out validation share (a fixed shuffle)."""
    if len(data) < 4:
        raise StudioError(f"{data.name} has {len(data)} samples: too few to hold some out")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    held = max(2, round(len(data) * fraction))
    parts = []
    for idx, suffix in ((order[held:], "train"), (order[:held], "held out")):
        y = None if data.y is None else data.y[idx]
        parts.append(DataSet(data.x[idx], y, f"{data.name} ({suffix})", data.classes))
    return parts[0], parts[1]


def weight_sparsity(module: nn.Module) -> float:
    """Fraction of exact zeros in the weights (parameters named *weight*, 2-D or more)."""
    weights = [
        p
        for n, p in module.named_parameters()
        if n.rsplit(".", 1)[-1].startswith("weight") and p.dim() >= 2
    ]
    total = sum(w.numel() for w in weights)
    with torch.no_grad():
        zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def capture_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    """Where each weight of 2 or more dimensions is exactly zero (only tensors with zeros)."""
    with torch.no_grad():
        zeros = {n: p == 0 for n, p in module.named_parameters() if p.dim() >= 2}
    return {n: z for n, z in zeros.items() if bool(z.any())}


def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor], grads: bool = False) -> None:
    """Zero the masked weights again (or their gradients, before the optimizer step)."""
    if not masks:
        return
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, zero in masks.items():
            p = params[name]
            if grads:
                if p.grad is not None:
                    p.grad.masked_fill_(zero, 0.0)
            else:
                p.masked_fill_(zero, 0.0)


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise StudioError("the model's output is not a tensor; cannot train it")
    return out.float().reshape(out.shape[0], -1)


LOSS_TOLERANCE = 1e-5  # a tie in the metric is broken by a validation loss lower than this


LOWER_IS_BETTER = ("perplexity",)


def better(new: dict[str, Any], old: dict[str, Any], metric: str) -> bool:
    """Higher metric (lower perplexity), or the same metric and a validation loss lower by
    more than noise."""
    if metric in LOWER_IS_BETTER:
        a, b = new.get(metric) or math.inf, old.get(metric) or math.inf
        if abs(a - b) > 1e-9:
            return a < b
    a, b = new.get(metric) or 0.0, old.get(metric) or 0.0
    if abs(a - b) > 1e-9:
        return a > b
    return (new.get("loss") or math.inf) < (old.get("loss") or math.inf) - LOSS_TOLERANCE


def epoch_record(
    history: list[TrainRecord],
    step: int,
    epoch: int,
    lr: float,
    module: nn.Module,
    metrics: dict[str, Any],
    is_best: bool,
    ratio_scale: float | None = None,
) -> TrainRecord:
    """The record at the end of ``epoch`` (0-based): its steps' mean loss and speed from
    ``history``, the module's sparsity, the validation ``metrics``."""
    return TrainRecord(
        "epoch",
        step,
        float(epoch + 1),
        _epoch_loss(history, epoch),
        lr,
        weight_sparsity(module),
        _epoch_speed(history, epoch),
        val_accuracy=metrics.get("accuracy"),
        val_loss=metrics.get("loss"),
        agreement=metrics.get("agreement"),
        perplexity=metrics.get("perplexity"),
        cosine=metrics.get("cosine"),
        is_best=is_best,
        ratio_scale=ratio_scale,
    )


def _epoch_loss(history: list[TrainRecord], epoch: int) -> float:
    steps = [r for r in history if r.kind == "step" and epoch < r.epoch <= epoch + 1]
    return sum(r.loss for r in steps) / len(steps) if steps else float("nan")


def _epoch_speed(history: list[TrainRecord], epoch: int) -> float:
    steps = [r for r in history if r.kind == "step" and epoch < r.epoch <= epoch + 1]
    return sum(r.samples_per_s for r in steps) / len(steps) if steps else 0.0
