"""Latency prediction accuracy: predicted vs measured ONNX Runtime latency of 30 random
structured plans per model (random per-group ratios), at batch 1 and 32.

    python benchmarks/latency_prediction.py [--models demo,zoo:mobilenetv2] [--plans 30]
        [--threads 1] [--repeats 3]

Each pruned model is timed side by side with the unpruned one (alternating blocks, so both see
the same load on a shared machine), ``--repeats`` times; the median is the measured latency.
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per timing round")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    lines = []
    for spec in args.models.split(","):
        model = load_model(spec)
        predictors = {}
        for batch in batches:
            began = time.perf_counter()
            predictors[batch] = LatencyPredictor.build(model, batch=batch, threads=args.threads)
            p = predictors[batch]
            print(
                f"{spec} batch {batch}: predictor built in {time.perf_counter() - began:.1f}s "
                f"({p.calibrated_points} new micro-benchmarks, fit error {p.fit_error:.1%})",
                flush=True,
            )
        cost = predictors[batches[0]].cost
        rng = np.random.default_rng(args.seed)
        original = onnx_session(model, args.threads)
        errors: dict[int, list[float]] = {b: [] for b in batches}
        normalised: dict[int, list[float]] = {b: [] for b in batches}
        predict_us: list[float] = []
        for i in range(args.plans):
            ratios = dict(zip(cost.names, rng.uniform(0.0, 0.7, len(cost.names)).tolist()))
            plan = PruningPlan("structured", "l1", ratios, recalibrate_bn=False)
            pruned = prune(model, plan).model
            sess = onnx_session(pruned, args.threads)
            for batch in batches:
                p = predictors[batch]
                t0 = time.perf_counter()
                predicted = p.predict(plan).total_ms
                predict_us.append((time.perf_counter() - t0) * 1e6)
                x = model.example_input(batch).numpy()
                rounds = [
                    export_onnx.latencies_ms([original, sess], x, args.budget)
                    for _ in range(args.repeats)
                ]
                measured = statistics.median(r[1] for r in rounds)
                scale = statistics.median(r[0] / r[1] for r in rounds)  # original / pruned
                errors[batch].append(predicted / measured - 1.0)
                # prediction relative to the unpruned model's prediction, times its measurement
                normalised[batch].append(predicted / p.original_ms / (1.0 / scale) - 1.0)
                print(
                    f"  plan {i + 1:2d} batch {batch:2d}: predicted {predicted:8.3f} ms, "
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
