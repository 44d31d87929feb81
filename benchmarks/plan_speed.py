"""Planner speed on the demo model: what the GUI pays on every slider move.

Prints the time per call of ``CostModel.predict`` (parameters and MACs after a plan) and of
``predicted_drop`` (quality drop read off the scan's curves) against the issue's 50 ms
budget, then each allocation strategy at a MACs target with its time, the MACs and
parameters it lands on and its predicted drop.

    .venv/bin/python benchmarks/plan_speed.py [--model demo] [--samples 128] [--target 0.5]
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.plan.allocate import CostModel, allocate, predicted_drop
from studio.core.plan.plan import PruningPlan
from studio.core.scan.sensitivity import scan
from studio.core.scan.types import ScanSettings

BUDGET_MS = 50.0


def per_call(fn, calls: int) -> float:
    """Seconds per call, best of 3 runs of ``calls`` calls."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--samples", type=int, default=128, help="scan images (demo data)")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of MACs to keep")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = load_model(args.model)
    data = demo_splits()[1].subset(args.samples)
    start = time.perf_counter()
    report = scan(model, data, ScanSettings(metric="loss"), use_cache=False)
    print(
        f"scan: {len(report.rows)} rows on {len(data)} images in {time.perf_counter() - start:.1f}s"
    )
    rng = random.Random(0)
    for method in ("structured", "unstructured"):
        start = time.perf_counter()
        cost = CostModel.build(model, method)
        built = time.perf_counter() - start
        ratios = {t.name: rng.uniform(0, 0.9) for t in cost.targets}
        t = per_call(lambda: cost.predict(ratios), 2000)  # noqa: B023
        print(
            f"predict ({method}, {len(cost.targets)} targets): {t * 1e6:.1f} us/call "
            f"({BUDGET_MS * 1e-3 / t:,.0f}x under {BUDGET_MS:g} ms); build {built:.2f}s"
        )
    cost = CostModel.build(model, "structured")
    ratios = {t.name: rng.uniform(0, 0.9) for t in cost.targets}
    predicted_drop(ratios, report)  # the curves are built once per report and cached
    t = per_call(lambda: predicted_drop(ratios, report), 2000)
    print(f"predicted_drop ({len(report.targets)} targets): {t * 1e6:.1f} us/call")
    print(f"allocation to {args.target:g} of the MACs (loss drop, summed over targets):")
    for strategy in ("uniform", "global", "sensitivity"):
        start = time.perf_counter()
        plan = allocate(cost, PruningPlan(), strategy, "macs", args.target, report=report)
        took = time.perf_counter() - start
        params, macs = cost.fractions(plan.ratios)
        drop = predicted_drop(plan.ratios, report)[0]
        print(
            f"  {strategy:<12} MACs {macs:.4f}  params {params:.4f}  predicted drop {drop:.4f}"
            f"  in {took * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
