"""Sensitivity scan speed on the demo model, all methods side by side in one process.

Prints the time of each method over ratios 0.1..0.9 (structured, whole validation split, no
cache), the speed-up of ``exact`` over ``naive`` with the largest difference between their
tables, and the speed-up of ``taylor`` over ``exact`` with the Spearman rank correlation of
their per-layer loss increases at ratio 0.5.

    .venv/bin/python benchmarks/sensitivity_speed.py [--model demo] [--mode structured]
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

from scipy.stats import spearmanr

from studio.core.models.data import load_data
from studio.core.models.load import load_model
from studio.core.scan.sensitivity import SensitivityScan
from studio.core.scan.types import ScanReport, ScanSettings


def timed(
    model, data, settings: ScanSettings, workers: int | None = None
) -> tuple[ScanReport, float]:
    job = SensitivityScan(model, data, settings, use_cache=False, workers=workers)
    start = time.perf_counter()
    job.prepare()
    for _ in job.run():
        pass
    assert job.report is not None
    return job.report, time.perf_counter() - start


def largest_difference(a: ScanReport, b: ScanReport) -> float:
    other = {(r.layer, r.ratio): r for r in b.rows}
    worst = 0.0
    for row in a.rows:
        twin = other[(row.layer, row.ratio)]
        for key in ("accuracy", "loss", "agreement", "kl"):
            x, y = getattr(row, key), getattr(twin, key)
            if x is not None and not (math.isnan(x) and math.isnan(y)):
                worst = max(worst, abs(x - y))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--mode", default="structured")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model, data = load_model(args.model), load_data(args.data)
    ratios = ScanSettings.default_ratios(args.mode)
    settings = ScanSettings(mode=args.mode, metric="loss", ratios=ratios)
    print(
        f"{model.name}, {len(data)} samples, {args.mode}, ratios {ratios}, {os.cpu_count()} cores"
    )
    naive, t_naive = timed(model, data, ScanSettings(**{**settings.__dict__, "method": "naive"}))
    print(f"naive            {t_naive:7.2f} s  ({len(naive.rows)} cells)")
    one, t_one = timed(model, data, settings, workers=1)
    print(f"exact, 1 replica {t_one:7.2f} s  speed-up over naive {t_naive / t_one:5.2f}x")
    exact, t_exact = timed(model, data, settings)
    worst = max(largest_difference(exact, naive), largest_difference(one, naive))
    print(
        f"exact            {t_exact:7.2f} s  speed-up over naive {t_naive / t_exact:5.2f}x  "
        f"largest difference {worst:.2e}"
    )
    taylor, t_taylor = timed(model, data, ScanSettings(**{**settings.__dict__, "method": "taylor"}))
    mid = 0.5 if 0.5 in ratios else ratios[len(ratios) // 2]
    drops = {r.layer: exact.drop(r) for r in exact.rows if r.ratio == mid}
    estimates = {r.layer: taylor.drop(r) for r in taylor.rows if r.ratio == mid}
    names = sorted(drops)
    rho = spearmanr([drops[n] for n in names], [estimates[n] for n in names]).statistic
    print(
        f"taylor           {t_taylor:7.2f} s  speed-up over exact {t_exact / t_taylor:5.1f}x  "
        f"Spearman at ratio {mid} {rho:.3f} ({len(names)} targets)"
    )


if __name__ == "__main__":
    main()
