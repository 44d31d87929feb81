"""Allocation: per-target ratios that bring a model's parameters or MACs to a target.

Every strategy is a one-parameter family of plans that prunes more as its parameter grows,
and a bisection on that parameter finds the least pruning that meets the target (the
predicted fraction at most the target; or just above it, within 2 %, when a single channel
step jumps over it):

- ``uniform``: the same ratio for every free target.
- ``global``: one threshold on mean-normalised channel (or weight) importance across all
  targets (:mod:`studio.core.importance`); a target's ratio is the fraction of its channels
  below the threshold, at most the plan's cap.
- ``sensitivity``: the equal-drop level of AIMET's greedy selection: every target takes the
  largest ratio whose predicted drop (:mod:`studio.core.drops`) is at most the level, and the
  level is the lowest that meets the target. Targets whose curves stay at 0 are pruned first
  (all together, scaled up to their largest zero-drop ratio). ``blocks`` plans measure each
  block's drop (loss with the block replaced by its shortcut) on the data given.

Locked targets keep their ratio, ignored ones stay at 0. Ratios are snapped to the exact
channel (or weight) count they remove, written so that a recipe's 6 decimals keep the count.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.core.costs import CostModel, PlanTarget
from studio.core.data import DataSet
from studio.core.drops import DropCurves, drop_curves, load_scan, predicted_drop
from studio.core.errors import StudioError
from studio.core.plan import PruningPlan
from studio.core.sensitivity_types import ScanReport

if TYPE_CHECKING:
    from studio.core.latency_predict import LatencyPredictor

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
]

STRATEGIES = ("uniform", "global", "sensitivity")
TARGET_KINDS = ("params", "macs", "latency")  # latency: by a LatencyPredictor
TOLERANCE = 0.02  # the achieved fraction lands within this of the target (of the original)
SCAN = 1000  # a latency target tries this many members of a family at most
NM_RATIO = 0.5  # N:M plans are 2:4: a target is either dense or 2 of every 4 zeroed
BLOCK_EVAL_SAMPLES = 512
_STEPS = 64

Family = Callable[[float], np.ndarray]  # parameter -> ratio of every target, in cost order


def allocate(
    cost: CostModel,
    plan: PruningPlan,
    strategy: str,
    target_kind: str,
    target_fraction: float,
    report: ScanReport | None = None,
    module: nn.Module | None = None,
    data: DataSet | None = None,
    predictor: LatencyPredictor | None = None,
) -> PruningPlan:
    """A copy of ``plan`` whose free ratios bring ``target_kind`` ('params', 'macs', or
    'latency' as ``predictor`` predicts it) to ``target_fraction`` of the original (0.5 =
    keep half), chosen by ``strategy``."""
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
    note = ""
    if strategy == "uniform":
        family, top = _uniform(cost, plan, base, free, on)
    elif strategy == "global":
        family, top = _global(cost, plan, base, free, module, data)
    else:
        curves, note = _curves(cost, plan, report, module, data)
        family, top = _sensitivity(cost, plan, base, free, curves, on)
    if plan.round_to > 1 and cost.method == "structured":
        family = _rounded(cost, family, free, plan.round_to)
    index = 0 if target_kind == "params" else 1
    before = cost.params_before if index == 0 else cost.macs_before

    def fraction(r: np.ndarray) -> float:
        return cost.predict_vector(r)[index] / max(1, before)

    measure = _latency_fraction(cost, predictor) if target_kind == "latency" else fraction
    ratios = _solve(family, top, measure, target_fraction, target_kind, strategy)
    snapped = _snap(cost, ratios)
    if strategy == "uniform" and cost.method == "structured" and plan.round_to == 1:
        snapped = ratios  # already 6-decimal steps
    elif strategy == "uniform":  # one ratio everywhere, if 6 decimals of it remove the same
        clean = np.where(free, np.ceil(ratios * 1e6 - 1e-6) / 1e6, ratios)
        if cost.predict_vector(clean) == cost.predict_vector(ratios):
            snapped = clean
    chosen = {n: float(v) for n, v, f in zip(cost.names, snapped, free) if f}
    target = {"kind": target_kind, "fraction": target_fraction, "allocate": strategy}
    if note:
        target["note"] = note
    if target_kind == "latency" and predictor is not None:
        target["predicted_ms"] = round(predictor.predict_ms(snapped), 4)
        target.update(runtime=predictor.runtime, batch=predictor.batch, threads=predictor.threads)
    return replace(plan.with_ratios(chosen), target=target)


def _latency_fraction(
    cost: CostModel, predictor: LatencyPredictor | None
) -> Callable[[np.ndarray], float]:
    """Predicted latency as a fraction of the unpruned model's, for ratios in cost order."""
    if predictor is None:
        raise StudioError("a latency target needs a latency predictor for the model")
    if cost.method != "structured":
        raise StudioError(
            f"a latency target needs structured pruning: {cost.method} zeros do not make a "
            "dense runtime faster"
        )
    order = {n: i for i, n in enumerate(predictor.cost.names)}
    if set(order) != set(cost.names):
        raise StudioError("the latency predictor was built for another model")
    index = np.array([order[n] for n in cost.names])
    original = predictor.original_ms or 1.0

    def fraction(r: np.ndarray) -> float:
        mapped = np.zeros(len(index))
        mapped[index] = r
        return predictor.predict_ms(mapped) / original

    return fraction


def _family(base: np.ndarray, free: np.ndarray, ratios: Family, top: float) -> Family:
    """Locked/ignored targets at their base ratio, free ones from ``ratios``, at most ``top``."""
    return lambda x: np.where(free, np.minimum(ratios(x), top), base)


def _solve(
    family: Family,
    top: float,
    fraction: Callable[[np.ndarray], float],
    target: float,
    kind: str,
    strategy: str,
) -> np.ndarray:
    """The family member meeting ``target`` with the least pruning, within TOLERANCE."""
    least, most = fraction(family(0.0)), fraction(family(top))
    if most > target + TOLERANCE:
        raise StudioError(
            f"{strategy} allocation cannot bring {kind} below {most:.1%} of the original "
            f"(the per-layer cap, locked and ignored layers limit it); target {target:.1%}"
        )
    if least < target - TOLERANCE:
        raise StudioError(
            f"locked ratios alone already bring {kind} to {least:.1%} of the original, "
            f"below the target {target:.1%}"
        )
    if least <= target:
        return family(0.0)
    lo, hi = 0.0, top  # fraction(lo) > target >= fraction(hi)
    if kind == "latency":  # not monotone in channels (layouts): scan the family first
        landed, lo, hi = _scan(family, top, fraction, target)
        if landed is not None:
            return landed
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        if fraction(family(mid)) <= target:
            hi = mid
        else:
            lo = mid
    if target - fraction(family(hi)) <= TOLERANCE:
        return family(hi)
    # one step of the family jumps too far: move targets from the lower step to the higher one
    # in model order, and take the first mix that meets the target
    r_over, r_met = family(lo), family(hi)
    differ = np.flatnonzero(r_over != r_met)

    def mix(j: int) -> np.ndarray:
        r = r_over.copy()
        r[differ[:j]] = r_met[differ[:j]]
        return r

    a, b = 0, differ.size  # fraction(mix(a)) > target >= fraction(mix(b))
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (a, mid) if fraction(mix(mid)) <= target else (mid, b)
    met, over = fraction(mix(b)), fraction(mix(a))
    if target - met <= TOLERANCE:
        return mix(b)
    if over - target <= TOLERANCE:
        return mix(a)
    if kind == "latency":  # latency is not monotone in channels (layouts): meet it, prune more
        return mix(b)
    raise StudioError(
        f"no {strategy} allocation lands within {TOLERANCE:.0%} of {target:.1%} of the {kind}: "
        f"the nearest are {over:.1%} and {met:.1%} (one step of a large layer)"
    )


def _scan(
    family: Callable[[float], np.ndarray],
    top: float,
    fraction: Callable[[np.ndarray], float],
    target: float,
) -> tuple[np.ndarray | None, float, float]:
    """The least pruning in ``family`` that lands within TOLERANCE of ``target``, or None and
    the neighbouring members (``lo``, ``hi``) across the target whose ``hi`` comes closest to
    it from below, to bisect and mix between. At most SCAN members are tried (every step of a
    family of fewer steps)."""
    xs = np.arange(0.0, top + 1.0) if 1 <= top <= SCAN else np.linspace(0.0, top, SCAN + 1)
    xs = np.unique(np.append(xs[xs <= top], top))  # the last member is always tried
    values = []
    for x in xs:
        ratios = family(float(x))
        values.append(fraction(ratios))
        if abs(values[-1] - target) <= TOLERANCE:
            return ratios, 0.0, 0.0
    pairs = [i for i in range(len(xs) - 1) if values[i] > target >= values[i + 1]]
    i = max(pairs, key=lambda j: values[j + 1], default=len(xs) - 2)
    return None, float(xs[i]), float(xs[i + 1])


def round_channels(cost: CostModel, ratios: np.ndarray, multiple: int) -> np.ndarray:
    """Structured ratios changed so that every target keeps a multiple of ``multiple``
    channels (the nearest; at least ``multiple``), as 6-decimal ratios. Vectorised CPU kernels
    (ONNX Runtime's NCHWc layout, oneDNN, GPU tensor cores) run channel counts that are not
    multiples of 8 or 16 on slower paths, so fewer MACs need not mean faster without this.
    Targets with fewer channels than ``multiple``, or removed a head at a time, are kept as
    they are; the map from ratio to channels is monotone, so allocation can bisect through it."""
    n = cost.steps()
    unit = cost.unit_sizes()
    removed = np.clip(np.floor(n * ratios + 1e-9), 0, n - 1)
    kept = n - removed
    rounded = np.maximum(multiple, multiple * np.round(kept / multiple))
    eligible = (unit == 1) & (n >= multiple)
    kept = np.where(eligible, np.minimum(rounded, n), kept)
    count = n - kept
    return np.where(count > 0, np.ceil(count / n * 1e6 - 1e-6) / 1e6, 0.0)


def _rounded(cost: CostModel, family: Family, free: np.ndarray, multiple: int) -> Family:
    """``family`` with the free targets' channel counts rounded to multiples of ``multiple``."""
    return lambda x: np.where(free, round_channels(cost, family(x), multiple), family(x))


def _snap(cost: CostModel, ratios: np.ndarray) -> np.ndarray:
    """Each ratio as the smallest 6-decimal number removing the same count of channels or
    weights (recipes keep 6 decimals; a ratio like 1/3 rounded down would remove one less)."""
    if cost.method in ("nm", "blocks"):
        return ratios
    n = cost.steps()
    count = np.clip(np.floor(n * ratios + 1e-9), 0, n)
    return np.where(count > 0, np.ceil(count / n * 1e6 - 1e-6) / 1e6, 0.0)


def _uniform(
    cost: CostModel, plan: PruningPlan, base: np.ndarray, free: np.ndarray, on: float | None
) -> tuple[Family, float]:
    n = len(cost.names)
    if cost.method == "blocks":
        raise StudioError("blocks are removed whole: allocate them by sensitivity")
    if on is not None:  # dense or 2:4 everywhere
        return _family(base, free, lambda x: np.full(n, on if x >= on else 0.0), on), on
    if cost.method != "structured":
        return _family(base, free, lambda x: np.full(n, x), plan.cap), plan.cap
    steps = _uniform_steps(cost, plan.cap)  # the ratios at which some group loses a channel

    def ratios(x: float) -> np.ndarray:
        return np.full(n, steps[int(x) - 1] if x >= 1 else 0.0)

    return _family(base, free, ratios, plan.cap), float(steps.size)


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
    from studio.core.importance import normalised_scores

    scores = normalised_scores(cost, plan.criterion, plan.seed, module, data)
    ordered = [scores[n] for n in cost.names]
    sizes = np.array([max(1, s.size) for s in ordered], float)
    top = max((float(s[-1]) for s in ordered if s.size), default=0.0) + 1.0

    def below(t: float) -> np.ndarray:
        return np.array([np.searchsorted(s, t, side="left") for s in ordered]) / sizes

    return _family(base, free, below, plan.cap), top


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

    return _family(base, free, ratios, on if on is not None else plan.cap), top


def _block_curves(cost: CostModel, module: nn.Module | None, data: DataSet | None) -> DropCurves:
    """Each block's loss increase when it alone is replaced by its shortcut."""
    from studio.core.prune_blocks import remove_block

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
