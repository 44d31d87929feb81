"""A latency target met as measured, not only as predicted.

The predictor (:mod:`studio.core.latency.predict`) is fitted on plans like the ones allocation
tries, and it can be far off on plans outside them: on the demo at batch 1 it put a plan that
keeps 8 channels everywhere at 59 % of the original where ONNX Runtime runs it at 26 %. So a
latency target is reached in a short loop on this machine, as NetAdapt does: the allocation
strategy walks its family by MACs (the staircase of runtime channel counts by default), each
candidate is pruned (structure only, no re-calibration) and timed against the original side by
side (:func:`studio.core.latency.fit.measure_passes`, quiet figures), and the MAC fraction is
corrected by interpolating between the candidates around the target, until one lands within
:data:`GOAL` of it. The predictor's plan is the first candidate when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.latency.fit import measure_passes, quiet
from studio.core.models.data import DataSet
from studio.core.models.loaded import LoadedModel
from studio.core.plan.allocate import CostModel, allocate
from studio.core.plan.plan import PruningPlan
from studio.core.plan.search import LatencyCost
from studio.core.prune.engine import prune
from studio.core.scan.types import ScanReport

GOAL = 0.05  # stop once a candidate's measured fraction is within 5 % of the target
ROUNDS = 6
SECONDS = 3.0  # side-by-side timing per candidate (1.5 s: resnet56 landed +12 % when re-timed)
PASSES = 8


@dataclass
class Candidate:
    macs: float  # the MAC fraction asked of allocation
    plan: PruningPlan
    measured: float  # quiet latency as a fraction of the original's, side by side


def reach_latency(
    model: LoadedModel,
    cost: CostModel,
    plan: PruningPlan,
    strategy: str,
    fraction: float,
    runtime: str = "onnxruntime",
    batch: int = 1,
    threads: int | None = None,
    report_: ScanReport | None = None,
    data: DataSet | None = None,
    first: PruningPlan | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    predictor: LatencyCost | None = None,
    layer_weights: np.ndarray | None = None,
) -> PruningPlan:
    """The plan of ``strategy`` whose measured latency is nearest ``fraction`` of the
    original's (from below when two are as near), within :data:`GOAL` when the family allows."""
    if not 0.0 < fraction < 1.0:
        raise StudioError(f"the latency target is a fraction in (0, 1), not {fraction:g}")
    tried: list[Candidate] = []

    def measure(macs: float, candidate: PruningPlan | None = None) -> Candidate:
        check(cancel)
        if candidate is None:
            candidate = allocate(
                cost, plan, strategy, "macs", macs, report_, model.module, data, None, layer_weights
            )
        structure = replace(candidate, recalibrate_bn=False)
        pruned = prune(model, structure).model
        passes = measure_passes(
            [model, pruned], runtime, batch, threads, PASSES, None, cancel, SECONDS
        )
        before, after = quiet(passes)
        landed = Candidate(macs, candidate, float(after / before))
        tried.append(landed)
        report(
            progress,
            min(0.95, len(tried) / ROUNDS),
            f"candidate {len(tried)}: {landed.measured:.1%} of the original's latency",
        )
        return landed

    start = fraction
    if first is not None and first.active():
        start = cost.fractions(first.ratios)[1]
        current = measure(start, first)
    else:
        current = measure(start)
    for _ in range(ROUNDS - 1):
        if abs(current.measured / fraction - 1.0) <= GOAL:
            break
        nxt = _next_macs(tried, fraction)
        if nxt is None or any(abs(nxt - c.macs) < 1e-4 for c in tried):
            break
        try:
            current = measure(nxt)
        except StudioError:  # beyond what the family reaches (cap, locks): half the way
            try:
                current = measure(0.5 * (nxt + tried[-1].macs))
            except StudioError:
                break
    best = min(tried, key=lambda c: (abs(c.measured / fraction - 1.0), c.measured > fraction))
    target = {"round_to": best.plan.round_to} if best.plan.round_to > 1 else {}
    target.update(
        kind="latency",
        fraction=fraction,
        allocate=strategy,
        measured=round(best.measured, 4),
        runtime=runtime,
        batch=batch,
        candidates=len(tried),
    )
    if threads is not None:
        target["threads"] = threads
    if predictor is not None:  # the estimate beside the measurement, for the recipe's reader
        r = cost.ratio_vector(best.plan.ratios)
        target["predicted_ms"] = round(predictor.predict_ms(r), 4)
    if abs(best.measured / fraction - 1.0) > 0.10:
        target["note"] = (
            f"the nearest plan measured {best.measured:.1%} of the original's latency "
            f"(asked {fraction:.1%}): the family does not reach nearer"
        )
    return replace(best.plan, target=target)


def _next_macs(tried: list[Candidate], fraction: float) -> float | None:
    """The next MAC fraction: interpolated between the nearest candidates on either side of
    the target, else scaled by how far the last one landed (latency ~ MACs + a constant)."""
    above = [c for c in tried if c.measured > fraction]
    below = [c for c in tried if c.measured <= fraction]
    if above and below:
        a = min(above, key=lambda c: c.measured)
        b = max(below, key=lambda c: c.measured)
        if a.measured == b.measured:
            return None
        t = (a.measured - fraction) / (a.measured - b.measured)
        return float(np.clip(a.macs + t * (b.macs - a.macs), 0.01, 1.0))
    last = tried[-1]
    return float(np.clip(last.macs * fraction / max(last.measured, 1e-6), 0.01, 0.999))
