"""Plans allocated to a latency target, pruned and measured: do they land within +-10 % of
the requested latency?

    python benchmarks/latency_target.py [--models demo,zoo:mobilenetv2] [--batches 1,32]
        [--fractions 0.6,0.7,0.8,0.9] [--strategies uniform,global] [--round-to 1]
        [--threads 1] [--passes 16] [--seconds 30]

For each model, batch, strategy and fraction, ``allocate(..., "latency", fraction)`` (what
``studio prune --target-latency`` does) makes a plan from the latency predictor; the plan is
pruned and timed side by side with the unpruned model in interleaved passes
(studio.core.latency.fit.time_passes). Printed per plan: the requested latency (the fraction of
the unpruned model's predicted latency, as ``--target-latency F`` asks, and as the ms that
``--target-latency MSms`` would ask), the measured latency (quiet: the fastest pass's median;
and the median of all passes), and the measured fraction of the unpruned model's measured
latency; then the share of plans within +-10 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.core.errors import StudioError  # noqa: E402
from studio.core.latency.fit import quiet, time_passes  # noqa: E402
from studio.core.latency.measure import onnx_session  # noqa: E402
from studio.core.latency.predict import LatencyPredictor  # noqa: E402
from studio.core.models import onnx_io as export_onnx  # noqa: E402
from studio.core.models.load import load_model  # noqa: E402
from studio.core.plan.allocate import allocate  # noqa: E402
from studio.core.plan.plan import PruningPlan  # noqa: E402
from studio.core.prune.engine import prune  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,zoo:mobilenetv2")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--fractions", default="0.6,0.7,0.8,0.9")
    parser.add_argument("--strategies", default="uniform,global")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=16)
    parser.add_argument("--round-to", type=int, default=1, help="channels kept: multiples of")
    parser.add_argument("--seconds", type=float, default=30.0, help="at least, per batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    results = {"ms": [], "fraction": [], "all runs": []}
    for spec in args.models.split(","):
        model = load_model(spec)
        for batch in (int(b) for b in args.batches.split(",")):
            predictor = LatencyPredictor.build(model, batch=batch, threads=args.threads)
            cases, sessions = [], [onnx_session(model, args.threads)]
            for strategy in args.strategies.split(","):
                for fraction in fractions:
                    try:
                        plan = allocate(
                            predictor.cost, PruningPlan("structured", round_to=args.round_to),
                            strategy, "latency",
                            fraction, module=model.module, predictor=predictor,
                        )  # fmt: skip
                    except StudioError as exc:
                        print(f"{spec} b{batch} {strategy} {fraction}: {exc}")
                        continue
                    cases.append((strategy, fraction, predictor.predict(plan).total_ms))
                    sessions.append(onnx_session(prune(model, plan).model, args.threads))
            x = model.example_input(batch).numpy()
            passes = time_passes(
                [lambda s=s, x=x: export_onnx.run(s, x) for s in sessions],
                args.passes,
                min_seconds=args.seconds,
            )
            calm, every = quiet(passes), np.median(passes, axis=0)
            print(
                f"{spec} batch {batch}: unpruned predicted {predictor.original_ms:.3f} ms, "
                f"measured quiet {calm[0]:.3f} ms, all runs {every[0]:.3f} ms"
            )
            for i, (strategy, fraction, predicted) in enumerate(cases, start=1):
                asked = fraction * predictor.original_ms
                errors = (
                    calm[i] / asked - 1.0,
                    calm[i] / calm[0] / fraction - 1.0,
                    every[i] / every[0] / fraction - 1.0,
                )
                for key, error in zip(results, errors):
                    results[key].append(error)
                print(
                    f"  {strategy:<8} {fraction:.2f}: asked {asked:8.3f} ms, predicted "
                    f"{predicted:8.3f} ms, measured quiet {calm[i]:8.3f} ms ({errors[0]:+.1%}); "
                    f"measured fraction quiet {calm[i] / calm[0]:.3f} ({errors[1]:+.1%}), "
                    f"all runs {every[i] / every[0]:.3f} ({errors[2]:+.1%})",
                    flush=True,
                )
    print()
    for key, errors in results.items():
        e = np.abs(errors)
        print(
            f"{key:>9}: {np.mean(e <= 0.10):.0%} of {len(e)} plans within +-10 % of the request "
            f"(worst {max(errors, key=abs):+.1%})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
