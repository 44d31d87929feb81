"""The per-model part of the latency prediction: the unpruned model and a few pruned variants
measured side by side, and a non-negative least-squares fit of what the table does not see."""

from __future__ import annotations

import itertools
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.latency import default_threads, torch_threads
from studio.core.models import LoadedModel
from studio.core.plan import PruningPlan

if TYPE_CHECKING:
    from studio.core.latency_predict import LatencyPredictor

FIT_RATIOS = (0.0, 0.25, 0.5)  # uniform variants measured for the fit, plus FIT_RANDOM plans
FIT_RANDOM = 6
FIT_BUDGET_S = 1.0  # seconds of side-by-side timing for the fit, per pass
FIT_PASSES = 3


def fit_model(
    predictor: LatencyPredictor,
    model: LoadedModel,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
) -> dict:
    """Measure the model and a few pruned variants side by side; least-squares the overhead."""
    from studio.core.prune import prune

    cost = predictor.cost
    rng = np.random.default_rng(0)
    vectors = [np.full(len(cost.names), r) for r in FIT_RATIOS]
    vectors += [rng.uniform(0.0, 0.7, len(cost.names)) for _ in range(FIT_RANDOM)]
    variants = []
    for i, r in enumerate(vectors):
        check(cancel)
        report(progress, 0.5 * i / len(vectors), "pruning variants for the fit")
        if not r.any():
            variants.append(model)
            continue
        plan = PruningPlan("structured", "l1", dict(zip(cost.names, r.tolist())))
        plan = PruningPlan("structured", "l1", plan.with_ratios({}).ratios, recalibrate_bn=False)
        variants.append(prune(model, plan).model)
    report(progress, 0.5, "measuring the model and its variants")
    passes = [  # medians of passes: a burst of load from other processes spoils one pass
        measure_side_by_side(
            variants, predictor.runtime, predictor.batch, predictor.threads, cancel, FIT_BUDGET_S
        )
        for _ in range(FIT_PASSES)
    ]
    measured = np.median(np.array(passes), axis=0)
    rows = []
    for r in vectors:
        times, extra = predictor._features(r)
        rows.append([times.sum(), extra, 1.0])
    features = np.array(rows)
    coef = least_squares(features, measured)
    error = float(np.max(np.abs(features @ coef / measured - 1.0)))
    report(progress, 1.0, "fitted")
    return {"coef": coef.tolist(), "error": error, "measured_ms": float(measured[0])}


def least_squares(features: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Relative least squares of ``measured = a * layers + e * extra nodes + b`` over the
    subsets of terms that keep the scales >= 0 (the layers' scale always in); the constant may
    be negative (the micro-benchmarks' kernel times carry the profiler's own cost per node,
    which a real run does not pay). A model whose variants add no extra nodes keeps ``e = a``."""
    w = 1.0 / measured
    n = features.shape[1]
    best, best_err = None, float("inf")
    for size in range(n, 0, -1):
        for cols in itertools.combinations(range(n), size):
            sub = features[:, cols] * w[:, None]
            if 0 not in cols or not sub.any(axis=0).all():
                continue
            sol, *_ = np.linalg.lstsq(sub, np.ones_like(measured), rcond=None)
            coef = np.zeros(n)
            coef[list(cols)] = sol
            if (coef[: n - 1] < 0).any():
                continue
            err = float(np.sum((features @ coef * w - 1.0) ** 2))
            if err < best_err - 1e-12:
                best, best_err = coef, err
    if best is None:
        return np.array([1.0, 1.0] + [0.0] * (n - 2))
    if best[1] == 0 and not features[:, 1].any():
        best[1] = best[0]
    return best


def measure_side_by_side(
    models: list[LoadedModel],
    runtime: str,
    batch: int,
    threads: int | None = None,
    cancel: CancelToken | None = None,
    budget_s: float = 2.0,
) -> list[float]:
    """Median latency in ms of each model, timed in alternating blocks so that all see the
    same machine load (ONNX Runtime: :func:`studio.core.export_onnx.latencies_ms`)."""
    from studio.core import export_onnx
    from studio.core.latency import onnx_session

    threads = threads or default_threads()
    with torch_threads(threads):
        if runtime == "onnxruntime":
            sessions = [onnx_session(m, threads) for m in models]
            check(cancel)
            return export_onnx.latencies_ms(
                sessions, models[0].example_input(batch).numpy(), budget_s
            )
        x = models[0].example_input(batch)
        times: list[list[float]] = [[] for _ in models]
        start = time.perf_counter()
        with torch.inference_mode():
            for m in models:
                m.module(x)
            while len(times[0]) < 20 or time.perf_counter() - start < budget_s:
                check(cancel)
                for m, bucket in zip(models, times):
                    for _ in range(5):
                        t0 = time.perf_counter()
                        m.module(x)
                        bucket.append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(b) for b in times]
