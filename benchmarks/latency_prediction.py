"""Latency prediction accuracy: predicted vs measured ONNX Runtime latency of 30 random
structured plans per model (random per-group ratios), at batch 1 and 32.

    python benchmarks/latency_prediction.py [--models demo,zoo:mobilenetv2] [--plans 30]
        [--threads 1] [--repeats 5] [--seed 1234] [--no-fit]

Each pruned model is timed side by side with the unpruned one (alternating blocks, so both see
the same load on a shared machine) in ``--repeats`` passes over all plans (a plan's repeats are
spread over the run); the median is the measured latency.
Printed per model and batch: the share of plans predicted within +-10 % of the measured
median and the worst error; "normalised" rescales the prediction by the unpruned model's
measured/predicted ratio of the same repeat (what remains when the machine's load is factored
out). The predictor is built first (micro-benchmarks and fit are cached; their time is shown).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.core import export_onnx  # noqa: E402
from studio.core.latency import onnx_session  # noqa: E402
from studio.core.latency_predict import LatencyPredictor  # noqa: E402
from studio.core.models import load_model  # noqa: E402
from studio.core.plan import PruningPlan  # noqa: E402
from studio.core.prune import prune  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,zoo:mobilenetv2")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--plans", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per timing round")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-fit", action="store_true", help="the table alone, no model fit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    lines = []
    for spec in args.models.split(","):
        model = load_model(spec)
        predictors = {}
        for batch in batches:
            began = time.perf_counter()
            predictors[batch] = LatencyPredictor.build(
                model, batch=batch, threads=args.threads, fit=not args.no_fit
            )
            p = predictors[batch]
            print(
                f"{spec} batch {batch}: predictor built in {time.perf_counter() - began:.1f}s "
                f"({p.calibrated_points} new micro-benchmarks, fit error {p.fit_error:.1%})",
                flush=True,
            )
        cost = predictors[batches[0]].cost
        rng = np.random.default_rng(args.seed)
        original = onnx_session(model, args.threads)
        plans, sessions = [], []
        for _ in range(args.plans):
            ratios = dict(zip(cost.names, rng.uniform(0.0, 0.7, len(cost.names)).tolist()))
            plan = PruningPlan("structured", "l1", ratios, recalibrate_bn=False)
            plans.append(plan)
            sessions.append(onnx_session(prune(model, plan).model, args.threads))
        predict_us: list[float] = []
        predicted = {b: [] for b in batches}
        for batch in batches:
            for plan in plans:
                t0 = time.perf_counter()
                predicted[batch].append(predictors[batch].predict(plan).total_ms)
                predict_us.append((time.perf_counter() - t0) * 1e6)
        # passes over all plans, so that the repeats of one plan are spread over time and a
        # burst of load from other processes touches one repeat, not all
        rounds: dict[tuple[int, int], list[list[float]]] = {}
        for repeat in range(args.repeats):
            for batch in batches:
                x = model.example_input(batch).numpy()
                for i, sess in enumerate(sessions):
                    pair = export_onnx.latencies_ms([original, sess], x, args.budget)
                    rounds.setdefault((batch, i), []).append(pair)
            print(f"  pass {repeat + 1}/{args.repeats} done", flush=True)
        errors: dict[int, list[float]] = {b: [] for b in batches}
        normalised: dict[int, list[float]] = {b: [] for b in batches}
        for batch in batches:
            p = predictors[batch]
            for i in range(len(plans)):
                pairs = rounds[(batch, i)]
                measured = statistics.median(r[1] for r in pairs)
                scale = statistics.median(r[0] / r[1] for r in pairs)  # original / pruned
                guess = predicted[batch][i]
                errors[batch].append(guess / measured - 1.0)
                # the prediction relative to the unpruned model's, times its measurement
                normalised[batch].append(guess / p.original_ms * scale - 1.0)
                print(
                    f"  plan {i + 1:2d} batch {batch:2d}: predicted {guess:8.3f} ms, "
                    f"measured {measured:8.3f} ms ({errors[batch][-1]:+.1%}; "
                    f"normalised {normalised[batch][-1]:+.1%})",
                    flush=True,
                )
        for batch in batches:
            e, n = np.abs(errors[batch]), np.abs(normalised[batch])
            lines.append(
                f"{spec:<16} batch {batch:2d}: within +-10%: {np.mean(e <= 0.10):5.0%} "
                f"(worst {max(errors[batch], key=abs):+.1%}); normalised: "
                f"{np.mean(n <= 0.10):5.0%} (worst {max(normalised[batch], key=abs):+.1%})"
            )
        lines.append(
            f"{spec:<16} predict(): median {statistics.median(predict_us):.0f} us per call"
        )
    print("\nthreads", args.threads, "| plans", args.plans, "| repeats", args.repeats)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
