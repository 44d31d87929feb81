"""Latency prediction accuracy on this CPU: predicted vs measured ONNX Runtime latency of
random structured plans and of runtime-aligned ones, at batch 1 and 32.

    python benchmarks/latency_prediction.py [--models demo,zoo:mobilenetv2] [--plans 30]
        [--aligned 30] [--threads 1] [--passes 16] [--seed 1234] [--recalibrate]

The CPU's model name, whether it has AVX-512 (avx512f) and so ONNX Runtime's NCHWc block (16
channels with AVX-512, 8 without: studio.core.latency.layout.nchwc_block) are printed first.
Per model, ``--plans`` random plans (random per-group ratios in [0, 0.7]) and ``--aligned``
runtime-aligned ones (drawn the same way, then every group's kept channel count rounded to a
multiple of the block: studio.core.plan.search.round_channels) are pruned.

The predictor is built first (micro-benchmarks and the per-model fit are cached on disk;
``--recalibrate`` makes both afresh; the time is shown). The unpruned model and every plan are
then timed in ``--passes`` interleaved passes, more until ``--seconds`` have passed (each gets
one short block of runs per pass, the passes spread over the whole timing, as the fit times its
variants: studio.core.latency.fit).
Printed per model and batch, for random and for aligned plans separately, the share of plans
predicted within +-10 % and the worst error, against two measured figures of each plan:

- quiet: the median of its fastest pass, its latency on the undisturbed machine;
- all runs: the median of all its passes, whatever else the machine was doing.

and, for each, how repeatable the measurement itself is: the share of plans whose figure from
the odd passes and from the even passes agree within +-10 % (no prediction can be checked to
+-10 % more often than the measurement repeats). "anchored" rescales the predictions so that
the unpruned model's equals its measured figure (as the Latency tab and ``studio latency
--predict`` anchor to a fresh measurement).
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

from studio.core.latency.fit import quiet, time_passes  # noqa: E402
from studio.core.latency.layout import nchwc_block  # noqa: E402
from studio.core.latency.measure import onnx_session  # noqa: E402
from studio.core.latency.predict import LatencyPredictor  # noqa: E402
from studio.core.models import onnx_io as export_onnx  # noqa: E402
from studio.core.models.load import load_model  # noqa: E402
from studio.core.plan.plan import PruningPlan  # noqa: E402
from studio.core.plan.search import round_channels  # noqa: E402
from studio.core.prune.engine import prune  # noqa: E402


def share(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    error = predicted / measured - 1.0
    return float(np.mean(np.abs(error) <= 0.10)), float(error[np.argmax(np.abs(error))])


def cpu() -> tuple[str, bool]:
    """This CPU's model name and whether it has AVX-512 (the avx512f flag)."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, "avx512f" in flags


def aligned_share(model, block: int) -> float:
    """The share of a model's convolutions whose output channels are a multiple of ``block``."""
    convs = [m for m in model.module.modules() if isinstance(m, torch.nn.Conv2d)]
    return float(np.mean([m.out_channels % block == 0 for m in convs])) if convs else 0.0


def summary(name: str, guess: np.ndarray, figures: dict, rows: np.ndarray) -> list[str]:
    """The lines for one set of plans (``rows``: their columns in the timing; column 0 is the
    unpruned model)."""
    lines = []
    for kind, (measured, odd, even) in figures.items():
        within, worst = share(guess[rows], measured[rows])
        anchored, worst_a = share(guess[rows] / guess[0] * measured[0], measured[rows])
        repeat = float(np.mean(np.abs(odd[rows] / even[rows] - 1.0) <= 0.10))
        lines.append(
            f"  {name:>7} {kind:>8}: within +-10%: {within:4.0%} (worst {worst:+.1%}); "
            f"anchored: {anchored:4.0%} (worst {worst_a:+.1%}); "
            f"measurement repeats within +-10%: {repeat:4.0%}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,zoo:mobilenetv2")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--plans", type=int, default=30, help="random plans per model")
    parser.add_argument(
        "--aligned", type=int, default=30, help="random plans aligned to the NCHWc block"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="at least, per batch")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--recalibrate", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    name, avx512 = cpu()
    block = nchwc_block()
    header = f"CPU: {name} | avx512f: {'yes' if avx512 else 'no'} | NCHWc block {block}"
    print(header, flush=True)
    lines = []
    for spec in args.models.split(","):
        model = load_model(spec)
        predictors = {}
        for batch in batches:
            began = time.perf_counter()
            predictors[batch] = p = LatencyPredictor.build(
                model, batch=batch, threads=args.threads, recalibrate=args.recalibrate
            )
            scales = ", ".join(f"{g} {c:.2f}" for g, c in zip(p.groups, p.coef))
            print(
                f"{spec} batch {batch}: predictor built in {time.perf_counter() - began:.1f}s "
                f"({p.calibrated_points} new micro-benchmarks; fit on its variants: worst "
                f"{p.fit_error:.1%}; scales {scales}, extra "
                f"{p.coef[-2]:.2f}, constant {p.coef[-1]:.3f} ms)",
                flush=True,
            )
        cost = predictors[batches[0]].cost
        rng = np.random.default_rng(args.seed)
        sessions = [onnx_session(model, args.threads)]
        plans, kinds, shares = [], [], {"random": [], "aligned": []}
        for i in range(args.plans + args.aligned):
            kind = "random" if i < args.plans else "aligned"
            r = rng.uniform(0.0, 0.7, len(cost.names))
            if kind == "aligned":
                r = round_channels(cost, r, block)
            ratios = dict(zip(cost.names, r.tolist()))
            plans.append(PruningPlan("structured", "l1", ratios, recalibrate_bn=False))
            kinds.append(kind)
            pruned = prune(model, plans[-1]).model
            shares[kind].append(aligned_share(pruned, block))
            sessions.append(onnx_session(pruned, args.threads))
        rows = {k: np.array([i + 1 for i, x in enumerate(kinds) if x == k]) for k in shares}
        lines.append(
            f"{spec}: convolutions with a multiple of {block} output channels: unpruned "
            f"{aligned_share(model, block):.0%}, "
            + ", ".join(f"{k} plans {np.mean(v):.0%}" for k, v in shares.items() if v)
        )
        predict_us: list[float] = []
        for batch in batches:
            p = predictors[batch]
            predicted = [p.predict({})]
            for plan in plans:
                t0 = time.perf_counter()
                predicted.append(p.predict(plan))
                predict_us.append((time.perf_counter() - t0) * 1e6)
            guess = np.array([x.total_ms for x in predicted])
            x = model.example_input(batch).numpy()
            runners = [lambda s=s, x=x: export_onnx.run(s, x) for s in sessions]
            began = time.perf_counter()
            passes = time_passes(
                runners,
                args.passes,
                lambda f, t, b=batch: print(f"  batch {b}: {t}", flush=True),
                min_seconds=args.seconds,
            )
            seconds = time.perf_counter() - began
            figures = {
                "quiet": (quiet(passes), quiet(passes[0::2]), quiet(passes[1::2])),
                "all runs": tuple(
                    np.median(a, axis=0) for a in (passes, passes[0::2], passes[1::2])
                ),
            }
            for i in range(1, len(sessions)):
                calm, every = figures["quiet"][0][i], figures["all runs"][0][i]
                print(
                    f"  {kinds[i - 1]:>7} plan {i:2d} batch {batch:2d}: predicted "
                    f"{guess[i]:8.3f} ms, measured "
                    f"quiet {calm:8.3f} ms ({guess[i] / calm - 1:+.1%}), "
                    f"all runs {every:8.3f} ms ({guess[i] / every - 1:+.1%})",
                    flush=True,
                )
            lines.append(
                f"{spec} batch {batch}: unpruned predicted {guess[0]:.3f} ms, measured quiet "
                f"{figures['quiet'][0][0]:.3f} ms, all runs {figures['all runs'][0][0]:.3f} ms; "
                f"{len(passes)} passes in {seconds:.0f}s"
            )
            for kind, columns in rows.items():
                if len(columns):
                    lines += summary(kind, guess, figures, columns)
        lines.append(f"{spec} predict(): median {statistics.median(predict_us):.0f} us per call")
    print(f"\n{header}")
    print(
        f"threads {args.threads} | plans {args.plans} random, {args.aligned} aligned | "
        f"passes {args.passes}"
    )
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
