"""Allocation: per-target ratios that bring a model's parameters or MACs to a target.

Every strategy is a one-parameter family of plans that prunes more as its parameter grows,
and a bisection on that parameter finds the least pruning that meets the target (the
predicted fraction at most the target; or just above it, within 2 %, when a single channel
step jumps over it):

- ``uniform``: the same ratio for every free target.
- ``global``: one threshold on mean-normalised channel (or weight) importance across all
  targets (:mod:`studio.core.plan.importance`); a target's ratio is the fraction of its channels
  below the threshold, at most the plan's cap.
- ``sensitivity``: the equal-drop level of AIMET's greedy selection: every target takes the
  largest ratio whose predicted drop (:mod:`studio.core.plan.drops`) is at most the level, and the
  level is the lowest that meets the target. Targets whose curves stay at 0 are pruned first
  (all together, scaled up to their largest zero-drop ratio). ``blocks`` plans measure each
  block's drop (loss with the block replaced by its shortcut) on the data given.

Locked targets keep their ratio, ignored ones stay at 0. Ratios are snapped to the exact
channel (or weight) count they remove, written so that a recipe's 6 decimals keep the count.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import StudioError
from studio.core.models.data import DataSet
from studio.core.plan.costs import CostModel, PlanTarget
from studio.core.plan.drops import DropCurves, drop_curves, load_scan, predicted_drop
from studio.core.plan.plan import PruningPlan
from studio.core.plan.search import (
    SCAN,
    TOLERANCE,
    Family,
    LatencyCost,
    latency_fraction,
    restrict,
    round_channels,
    rounded,
    snap,
    solve,
)
from studio.core.plan.staircase import staircase
from studio.core.scan.types import ScanReport

__all__ = [
    "CostModel",
    "PlanTarget",
    "allocate",
    "load_scan",
    "predicted_drop",
    "round_channels",
    "STRATEGIES",
    "TARGET_KINDS",
    "TOLERANCE",
    "SCAN",
    "LatencyCost",
]

STRATEGIES = ("uniform", "global", "sensitivity")
TARGET_KINDS = ("params", "macs", "latency")  # latency: by a LatencyCost (a predictor)
NM_RATIO = 0.5  # N:M plans are 2:4: a target is either dense or 2 of every 4 zeroed
BLOCK_EVAL_SAMPLES = 512


def allocate(
    cost: CostModel,
    plan: PruningPlan,
    strategy: str,
    target_kind: str,
    target_fraction: float,
    report: ScanReport | None = None,
    module: nn.Module | None = None,
    data: DataSet | None = None,
    predictor: LatencyCost | None = None,
    layer_weights: np.ndarray | None = None,
) -> PruningPlan:
    """A copy of ``plan`` whose free ratios bring ``target_kind`` ('params', 'macs', or
    'latency' as ``predictor`` predicts it) to ``target_fraction`` of the original (0.5 =
    keep half), chosen by ``strategy``. ``layer_weights`` (ms per MAC of each layer of
    ``cost.rows``, measured: :func:`studio.core.latency.weights.layer_weights`) make sensitivity
    allocation on runtime channels take the least drop per millisecond saved, not per MAC."""
    if strategy not in STRATEGIES:
        raise StudioError(f"unknown allocation {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if target_kind not in TARGET_KINDS:
        raise StudioError(f"unknown target {target_kind!r}: choose params, macs or latency")
    if not isinstance(target_fraction, int | float) or not 0.0 < target_fraction <= 1.0:
        raise StudioError(
            f"the {target_kind} target is the fraction to keep, in (0, 1], not {target_fraction!r}"
        )
    if plan.method != cost.method:
        raise StudioError(
            f"the plan is {plan.method} but the cost model was built for {cost.method}"
        )
    base = cost.ratio_vector({n: plan.ratio(n) for n in cost.names if n in plan.locked})
    free = np.array([n not in plan.locked and n not in plan.ignored for n in cost.names])
    if not free.any():
        raise StudioError("every target is locked or ignored: there is nothing to allocate")
    on = {"nm": NM_RATIO, "blocks": 1.0}.get(cost.method)
    aligned = plan.round_to > 1 and cost.method == "structured"
    note = ""
    if strategy == "uniform":
        family, top = _uniform(cost, plan, base, free, on)
    elif strategy == "global":
        family, top = _global(cost, plan, base, free, module, data)
    else:
        curves, note = _curves(cost, plan, report, module, data)
        if aligned:  # allocate on the stairs of allowed counts, not round afterwards
            family, top = staircase(
                cost, base, free, curves, plan.round_to, plan.cap, layer_weights
            )
        else:
            family, top = _sensitivity(cost, plan, base, free, curves, on)
    if aligned and strategy != "sensitivity":
        family = rounded(cost, family, free, plan.round_to)
    index = 0 if target_kind == "params" else 1
    before = cost.params_before if index == 0 else cost.macs_before

    def fraction(r: np.ndarray) -> float:
        return cost.predict_vector(r)[index] / max(1, before)

    measure = latency_fraction(cost, predictor) if target_kind == "latency" else fraction
    ratios = solve(family, top, measure, target_fraction, target_kind, strategy, coarse=aligned)
    snapped = snap(cost, ratios)
    if strategy == "uniform" and cost.method == "structured" and plan.round_to == 1:
        snapped = ratios  # already 6-decimal steps
    elif strategy == "uniform":  # one ratio everywhere, if 6 decimals of it remove the same
        clean = np.where(free, np.maximum(0.0, np.ceil(ratios * 1e6 - 1e-6) / 1e6), ratios)
        if cost.predict_vector(clean) == cost.predict_vector(ratios):
            snapped = clean
    chosen = {n: float(v) for n, v, f in zip(cost.names, snapped, free) if f}
    target = {"kind": target_kind, "fraction": target_fraction, "allocate": strategy}
    if aligned:
        target["round_to"] = plan.round_to
        landed = measure(snapped)
        if abs(landed - target_fraction) > TOLERANCE:
            stair = (
                f"channels ×{plan.round_to}: {target_kind} lands at {landed:.1%}, the nearest stair"
            )
            note = f"{note}; {stair}" if note else stair
    if note:
        target["note"] = note
    if target_kind == "latency" and predictor is not None:
        target["predicted_ms"] = round(predictor.predict_ms(snapped), 4)
        target.update(runtime=predictor.runtime, batch=predictor.batch, threads=predictor.threads)
    return replace(plan.with_ratios(chosen), target=target)


def _uniform(
    cost: CostModel, plan: PruningPlan, base: np.ndarray, free: np.ndarray, on: float | None
) -> tuple[Family, float]:
    n = len(cost.names)
    if cost.method == "blocks":
        raise StudioError("blocks are removed whole: allocate them by sensitivity")
    if on is not None:  # dense or 2:4 everywhere
        return restrict(base, free, lambda x: np.full(n, on if x >= on else 0.0), on), on
    if cost.method != "structured":
        return restrict(base, free, lambda x: np.full(n, x), plan.cap), plan.cap
    steps = _uniform_steps(cost, plan.cap)  # the ratios at which some group loses a channel

    def ratios(x: float) -> np.ndarray:
        return np.full(n, steps[int(x) - 1] if x >= 1 else 0.0)

    return restrict(base, free, ratios, plan.cap), float(steps.size)


def _uniform_steps(cost: CostModel, cap: float) -> np.ndarray:
    """Every ratio (6 decimals, rounded up) at which some group's channel count changes."""
    values = {
        math.ceil(k / n * 1e6 - 1e-6) / 1e6 for n in cost.steps().astype(int) for k in range(1, n)
    }
    return np.array(sorted(v for v in values | {cap} if v <= cap))


# ---- global: one threshold on normalised importance ---------------------------------------


def _global(
    cost: CostModel,
    plan: PruningPlan,
    base: np.ndarray,
    free: np.ndarray,
    module: nn.Module | None,
    data: DataSet | None,
) -> tuple[Family, float]:
    from studio.core.plan.importance import normalised_scores

    scores = normalised_scores(cost, plan.criterion, plan.seed, module, data)
    ordered = [scores[n] for n in cost.names]
    sizes = np.array([max(1, s.size) for s in ordered], float)
    top = max((float(s[-1]) for s in ordered if s.size), default=0.0) + 1.0

    def below(t: float) -> np.ndarray:
        return np.array([np.searchsorted(s, t, side="left") for s in ordered]) / sizes

    return restrict(base, free, below, plan.cap), top


# ---- sensitivity: the equal-drop level ------------------------------------------------------


def _curves(
    cost: CostModel,
    plan: PruningPlan,
    report: ScanReport | None,
    module: nn.Module | None,
    data: DataSet | None,
) -> tuple[DropCurves, str]:
    """Drop curves of the plan's targets, and a note naming targets without one."""
    if cost.method == "blocks":
        return _block_curves(cost, module, data), ""
    if report is None:
        raise StudioError("sensitivity allocation needs a sensitivity scan (--scan FILE)")
    if report.settings.mode != cost.method:
        raise StudioError(
            f"the scan is {report.settings.mode} but the plan is {cost.method}: "
            f"scan with --mode {cost.method}"
        )
    curves = drop_curves(report)
    known = set(curves.names)
    missing = [n for n in cost.names if n not in known and n not in plan.ignored]
    if len(missing) == len(cost.names):
        raise StudioError("none of the plan's targets were measured by the scan")
    note = ""
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        note = f"{len(missing)} target(s) not in the scan are not pruned: {shown}"
    return curves, note


def _sensitivity(
    cost: CostModel,
    plan: PruningPlan,
    base: np.ndarray,
    free: np.ndarray,
    curves: DropCurves,
    on: float | None,
) -> tuple[Family, float]:
    """Parameter in [0, 1]: zero-drop targets scaled up together; above 1: the drop level."""
    where = {n: i for i, n in enumerate(cost.names)}
    idx = np.array([where[n] for n in curves.names if n in where], int)
    rows = np.array([i for i, n in enumerate(curves.names) if n in where], int)
    sub = DropCurves([curves.names[i] for i in rows], curves.xs, curves.ys[rows])
    free = free.copy()
    free[np.setdiff1d(np.arange(len(cost.names)), idx)] = False
    if on is not None:  # dense or 2:4 / kept or removed: a target is on once its drop fits
        drop_on = sub.at(np.full(len(idx), on))

        def at_level(level: float) -> np.ndarray:
            return np.where(drop_on <= level, on, 0.0)

        zero = np.flatnonzero(drop_on <= 0)
        levels = drop_on
    else:
        cap = np.full(len(idx), plan.cap)
        levels = sub.at(cap)

        def at_level(level: float) -> np.ndarray:
            return sub.inverse(level, cap)

        zero = np.arange(len(idx))
    free_max = at_level(0.0)
    top = 1.0 + float(levels.max(initial=0.0))

    def ratios(x: float) -> np.ndarray:
        out = np.zeros(len(cost.names))
        if x <= 1.0:
            part = np.zeros(len(idx))
            if on is None:
                part[zero] = x * free_max[zero]
            else:  # switch zero-drop targets on one by one, in model order
                part[zero[: int(math.floor(x * len(zero) + 1e-9))]] = on
            out[idx] = part
        else:
            out[idx] = at_level(x - 1.0)
        return out

    return restrict(base, free, ratios, on if on is not None else plan.cap), top


def _block_curves(cost: CostModel, module: nn.Module | None, data: DataSet | None) -> DropCurves:
    """Each block's loss increase when it alone is replaced by its shortcut."""
    from studio.core.models.blocks import remove_block

    module = module if module is not None else cost.module
    if module is None or data is None or len(data) == 0:
        raise StudioError("allocating blocks by sensitivity needs data to measure them (--data)")
    x = data.x[:BLOCK_EVAL_SAMPLES]
    with torch.inference_mode():
        reference = module(x)
        labels = reference.argmax(1) if data.y is None else data.y[:BLOCK_EVAL_SAMPLES]
        base = float(F.cross_entropy(reference, labels))
        drops = []
        for target in cost.targets:
            replica = copy.deepcopy(module)
            remove_block(replica, target.name)
            drops.append(max(0.0, float(F.cross_entropy(replica(x), labels)) - base))
    return DropCurves(list(cost.names), np.array([0.0, 1.0]), np.array([[0.0, d] for d in drops]))
