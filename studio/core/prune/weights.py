"""Unstructured and N:M pruning: weights zeroed in place, the zeros plain values in the tensor
(no masks, hooks or parametrizations left behind). The weights to zero are chosen by
:func:`studio.core.scan.masks.weight_mask`, as the unstructured and nm sensitivity scans choose
them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models.data import DataSet
from studio.core.plan.plan import CHANNEL_ONLY, PruningPlan
from studio.core.scan.masks import MASKABLE, nm_view, weight_mask
from studio.core.scan.types import NM_GROUP

GRADIENT_BATCH = 64


def weight_targets(module: nn.Module, mode: str) -> list[str]:
    """Layers owning a weight of 2 or more dimensions (nm: whose rows split into groups of 4)."""
    return [
        name
        for name, mod in module.named_modules()
        if isinstance(mod, MASKABLE)
        and mod.weight.dim() >= 2
        and (mode != "nm" or nm_view(mod.weight) is not None)
    ]


def nm_zeros(ratio: float) -> int:
    """Zeros in every group of 4 for an nm ratio: round(ratio * 4) (0.5 = 2:4), at most 3
    so that no layer is emptied."""
    return min(NM_GROUP - 1, round(ratio * NM_GROUP))


def gradient_pass(module: nn.Module, data: DataSet, cancel: CancelToken | None = None) -> None:
    """Leave in every parameter's ``.grad`` the gradient of the mean cross-entropy over
    ``data`` (labels, or the model's own top-1 for unlabeled data), in eval mode."""
    if len(data) == 0:
        raise StudioError(f"data set {data.name} is empty")
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    module.eval()
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        for i in range(0, len(data), GRADIENT_BATCH):
            check(cancel)
            x = data.x[i : i + GRADIENT_BATCH]
            with torch.enable_grad():
                out = module(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                y = data.y[i : i + GRADIENT_BATCH] if data.y is not None else out.argmax(1)
                (F.cross_entropy(out, y, reduction="sum") / len(data)).backward()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def prune_weights(
    module: nn.Module,
    plan: PruningPlan,
    data: DataSet | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> list[str]:
    """Zero weights of ``module`` in place by an unstructured or nm ``plan``; returns notes."""
    if plan.criterion in CHANNEL_ONLY:
        raise StudioError(
            f"the {plan.criterion} criterion ranks channels: use it with --method structured"
        )
    mods = dict(module.named_modules())
    active = plan.active()
    if plan.criterion == "taylor":
        if data is None:
            raise StudioError("the taylor criterion needs data for its gradient pass: give --data")
        gradient_pass(module, data, cancel)
    notes = []
    generator = torch.Generator().manual_seed(plan.seed)
    try:
        for i, (name, ratio) in enumerate(active.items()):
            check(cancel)
            report(progress, i / max(1, len(active)), name)
            weight = mods[name].weight
            if plan.method == "nm":
                zeros = nm_zeros(ratio)
                if abs(ratio * NM_GROUP - zeros) > 1e-9:
                    notes.append(f"{name}: ratio {ratio:g} zeroes {zeros} of every 4 weights")
                if zeros == 0:
                    continue
                ratio = zeros / NM_GROUP
            if plan.criterion in ("l1", "l2"):  # exactly the scan's masks
                mask = weight_mask(weight, ratio, plan.method, plan.criterion)
            else:
                scores = _scores(weight, plan.criterion, generator)
                mask = weight_mask(scores, ratio, plan.method, "l1")
            with torch.no_grad():
                weight.masked_fill_(mask == 0, 0.0)
    finally:
        for p in module.parameters():
            p.grad = None
    report(progress, 1.0, f"{len(active)} layers")
    return notes


def _scores(weight: torch.Tensor, criterion: str, generator: torch.Generator) -> torch.Tensor:
    """Per-weight importance for the criteria other than magnitude (lower = zeroed first)."""
    if criterion == "taylor":
        assert weight.grad is not None
        return (weight.detach() * weight.grad).abs()
    if criterion == "random":
        return torch.rand(weight.shape, generator=generator)
    return weight.detach().abs()
