"""Which channels or weights a ratio removes: shared by the scan and the pruning engine."""

from __future__ import annotations

import math

import torch
from torch import nn

from studio.core.scan.types import NM_GROUP

MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def channels_to_prune(channels: int, ratio: float) -> int:
    """How many of ``channels`` a ratio removes (floor, never all of them)."""
    return min(channels - 1, max(0, math.floor(channels * ratio + 1e-9)))


def weight_mask(weight: torch.Tensor, ratio: float, mode: str, criterion: str) -> torch.Tensor:
    """Keep-mask (1 = keep) removing the smallest weights: a fraction, or N of every 4."""
    magnitude = weight.detach().abs()
    if criterion == "l2":
        magnitude = magnitude * magnitude
    if mode == "nm":
        view = nm_view(magnitude)
        assert view is not None
        zeros = round(ratio * NM_GROUP)
        order = view.argsort(dim=-1, stable=True)
        keep = torch.ones_like(view)
        keep.scatter_(-1, order[..., :zeros], 0.0)
        return nm_unview(keep, weight.shape)
    k = math.floor(weight.numel() * ratio + 1e-9)
    flat = magnitude.flatten()
    keep = torch.ones_like(flat)
    keep[flat.argsort(stable=True)[:k]] = 0.0
    return keep.view_as(weight)


def nm_view(weight: torch.Tensor) -> torch.Tensor | None:
    """Weights as (..., groups, 4) along the input dimension (channels-last for convs)."""
    w = weight.movedim(1, -1) if weight.dim() > 2 else weight
    if w.shape[-1] % NM_GROUP:
        return None
    return w.reshape(*w.shape[:-1], w.shape[-1] // NM_GROUP, NM_GROUP)


def nm_unview(view: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        return view.reshape(moved).movedim(-1, 1)
    return view.reshape(shape)
