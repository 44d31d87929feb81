"""The per-model part of the latency prediction: the unpruned model and a few dozen pruned
variants timed in interleaved passes, and a bounded least-squares fit of what the lookup table
does not see.

Timing on a shared machine: something outside this VM (presumably another tenant on the same
physical core) moves it between speed states for 0.5 to 2 seconds at a time (the demo's unpruned
latency at batch 1 sat at 1.07, 1.3-1.5 or 2.0 ms, by half-second windows), so the median of all
runs of a model depends on how much of its timing fell into each state, and two measurements of
the same plan a few minutes apart agreed within 10 % for only 52-80 % of 60 plans.
:func:`time_passes` gives every model one short block of runs per pass, passes spread over the
whole timing, and :func:`quiet` keeps the fastest pass's median: the latency on the undisturbed
machine, which the two halves of one such timing agreed on within 10 % for 97-98 % of the same
plans (the micro-benchmarks keep the fastest pass for the same reason).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np

from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.latency.alignment import channel_multiple
from studio.core.latency.measure import _runner, default_threads, torch_threads
from studio.core.latency.types import LatencyMeasurement
from studio.core.models.loaded import LoadedModel
from studio.core.plan.costs import CostModel
from studio.core.plan.plan import PruningPlan
from studio.core.plan.search import round_channels
from studio.core.prune.engine import prune


class Fittable(Protocol):
    """What the fit needs of the predictor it calibrates (``LatencyPredictor``, which calls
    :func:`fit_model` with itself)."""

    cost: CostModel
    runtime: str
    batch: int
    threads: int

    def fit_features(self, r: np.ndarray) -> np.ndarray: ...


FIT_RATIOS = (0.0, 0.2, 0.4, 0.6)  # uniform variants measured for the fit, plus random plans:
FIT_RANDOM = 24  # half with ratios in [0, 0.7], half in [0.2, 0.9] (targets allocate there)
FIT_ROUNDED = 12  # and random plans whose channel counts are multiples of the runtime's block
FIT_ROUNDED_UNIFORM = (0.5, 0.75)  # and uniform ones (the default plans are aligned)
FIT_PASSES = 12  # interleaved passes over all variants; each variant's fastest pass is kept
FIT_SECONDS = 20.0  # and more passes until this long: a pass must see more than one state
BLOCK_S = 0.02  # a block of runs lasts about this long (at least MIN_BLOCK, at most MAX_BLOCK)
MIN_BLOCK, MAX_BLOCK = 3, 10
MAX_PASSES = 1000
ORIGINAL_WEIGHT = 3.0  # the unpruned model counts this many times in the fit
RIDGE = 0.03  # pull of each regime's scale towards the shared one (squared-error units)


def fit_model(
    predictor: Fittable,
    model: LoadedModel,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
) -> dict:
    """Time the model and its variants in interleaved passes; fit one scale per layer regime
    (the predictor's ``groups``), one for the extra nodes and a constant."""
    cost = predictor.cost
    rng = np.random.default_rng(0)
    n = len(cost.names)
    vectors = [np.full(n, r) for r in FIT_RATIOS]
    vectors += [
        rng.uniform(*((0.0, 0.7) if i % 2 == 0 else (0.2, 0.9)), n) for i in range(FIT_RANDOM)
    ]
    multiple = channel_multiple(predictor.runtime).multiple  # the plans allocation makes
    vectors += [
        round_channels(cost, rng.uniform(0.0, 0.3 + 0.6 * (i + 1) / FIT_ROUNDED, n), multiple)
        for i in range(FIT_ROUNDED)
    ]
    vectors += [round_channels(cost, np.full(n, r), multiple) for r in FIT_ROUNDED_UNIFORM]
    variants = []
    for i, r in enumerate(vectors):
        check(cancel)
        report(progress, 0.3 * i / len(vectors), f"pruning variants for the fit {i + 1}")
        if not r.any():
            variants.append(model)
            continue
        plan = PruningPlan("structured", "l1", dict(zip(cost.names, r.tolist())))
        plan = PruningPlan("structured", "l1", plan.with_ratios({}).ratios, recalibrate_bn=False)
        variants.append(prune(model, plan).model)
    passes = measure_passes(
        variants,
        predictor.runtime,
        predictor.batch,
        predictor.threads,
        FIT_PASSES,
        lambda f, text: report(progress, 0.3 + 0.7 * f, text),
        cancel,
        FIT_SECONDS,
    )
    measured = quiet(passes)
    features = np.array([predictor.fit_features(r) for r in vectors])
    weights = np.ones(len(vectors))
    weights[[i for i, r in enumerate(vectors) if not r.any()]] = ORIGINAL_WEIGHT
    coef = least_squares(features, measured, weights)
    error = float(np.max(np.abs(features @ coef / measured - 1.0)))
    report(progress, 1.0, "fitted")
    return {"coef": coef.tolist(), "error": error, "measured_ms": float(measured[0])}


def least_squares(
    features: np.ndarray, measured: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Relative least squares of ``measured = features @ coef`` (columns: table time per layer
    regime, extra nodes, constant) with every coefficient but the constant >= 0 and each
    regime's scale pulled towards the scale of all layers together (:data:`RIDGE`: a regime
    whose time moves with another's, as a classifier's moves with the last convolution's,
    would otherwise take any scale). The constant may be negative: the micro-benchmarks'
    kernel times carry the profiler's own cost per node, which a real run does not pay. A
    regime no variant reached gets the scale of all layers together."""
    from scipy.optimize import lsq_linear

    w = (weights if weights is not None else np.ones(len(measured))) / measured
    n = features.shape[1]
    groups = n - 2
    layers = features[:, :groups].sum(axis=1)
    together = np.stack([layers, features[:, -2], features[:, -1]], axis=1) * w[:, None]
    shared = lsq_linear(together, measured * w, bounds=([0.0, 0.0, -np.inf], np.inf)).x
    used = features.any(axis=0)
    used[-1] = True
    reached = np.flatnonzero(used[:groups])
    pull = np.zeros((len(reached), n))
    pull[np.arange(len(reached)), reached] = np.sqrt(RIDGE)
    a = np.vstack([features * w[:, None], pull])[:, used]
    b = np.concatenate([measured * w, np.full(len(reached), np.sqrt(RIDGE) * shared[0])])
    lower = np.zeros(n)
    lower[-1] = -np.inf
    coef = np.zeros(n)
    coef[used] = lsq_linear(a, b, bounds=(lower[used], np.inf)).x
    coef[:groups][~used[:groups]] = shared[0]
    if not used[-2]:  # no variant adds a node: keep the layers' scale for plans that do
        coef[-2] = shared[0]
    return coef


def quiet(passes: np.ndarray) -> np.ndarray:
    """Each model's latency on the undisturbed machine: its fastest pass's median."""
    return passes.min(axis=0)


def measure_passes(
    models: Sequence[LoadedModel],
    runtime: str,
    batch: int,
    threads: int | None,
    passes: int,
    progress: Callable[[float, str], None] | None = None,
    cancel: CancelToken | None = None,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """The median ms of each model's block of runs in each of at least ``passes``
    interleaved passes, more until ``min_seconds`` have passed (array ``passes x models``); a
    block lasts about :data:`BLOCK_S`."""
    threads = threads or default_threads()
    with torch_threads(threads):
        runners = [_runner(m, runtime, batch, threads, "cpu") for m in models]
        return time_passes(runners, passes, progress, cancel, min_seconds)


def time_passes(
    runners: Sequence[Callable[[], object]],
    passes: int,
    progress: Callable[[float, str], None] | None = None,
    cancel: CancelToken | None = None,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """:func:`measure_passes` for callables (warmed up here, sized from the first runs)."""
    blocks = []
    for run in runners:
        check(cancel)
        run()
        t0 = time.perf_counter()
        run()
        single = time.perf_counter() - t0
        blocks.append(min(MAX_BLOCK, max(MIN_BLOCK, math.ceil(BLOCK_S / max(single, 1e-6)))))
    rows: list[list[float]] = []
    start = time.perf_counter()
    while len(rows) < passes or (
        time.perf_counter() - start < min_seconds and len(rows) < MAX_PASSES
    ):
        row = []
        for run, size in zip(runners, blocks):
            check(cancel)
            times = []
            for _ in range(size):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
            row.append(statistics.median(times))
        rows.append(row)
        if progress is not None:
            spent = (time.perf_counter() - start) / min_seconds if min_seconds > 0 else 1.0
            progress(min(1.0, len(rows) / passes, spent), f"timing pass {len(rows)}")
    return np.array(rows)


def quiet_side_by_side(
    models: Sequence[LoadedModel],
    measurements: Sequence[LatencyMeasurement],
    seconds: float,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> list[LatencyMeasurement]:
    """``measurements`` (CPU, one per model, same settings) with ``quiet_ms`` from interleaved
    passes over all the models for ``seconds``: measured one after another, a model whose whole
    measurement fell into a slow spell of the machine would look slower than its neighbours."""
    first = measurements[0]
    passes = measure_passes(
        models, first.runtime, first.batch, first.threads, 4, progress, cancel, seconds
    )
    return [replace(m, quiet_ms=float(q)) for m, q in zip(measurements, quiet(passes))]
