"""Sensitivity scans on Ray: measured here with 1 and 2 workers, modelled for 1 to 64.

Runs in one process, side by side: the in-process exact scan (the reference), then the same
scan on a local Ray instance with 1 worker and with 2 workers (no cache). Prints

- the largest difference between the Ray tables and the in-process table (same numbers);
- what each scan cost: Ray start, worker start-up (copy of model and data + prepare), the
  bytes put into the object store, the time of every unit (one target and its ratios), and the
  driver's overhead per unit;
- the 2-worker vs 1-worker speed-up measured on this machine;
- a model of the scan's time on a cluster of 1..64 one-CPU workers built from those
  measurements: T(n) = start-up + transfer(n) + makespan(n) + units x overhead, where the
  makespan is the driver's own schedule (the units split_units makes for n workers, handed in
  order to the first free worker) simulated with the measured per-row time of each target,
  and the transfer is n copies of the objects leaving the head node at ``--bandwidth`` (one
  node cannot measure a network; 10 GbE by default).
  The table says what bounds each row: start-up, object transfer, or the slowest unit.

    .venv/bin/python benchmarks/ray_scan_scaling.py [--model demo] [--ratios 0.1,...,0.9]
        [--bandwidth 1.25e9]
"""

from __future__ import annotations

import argparse
import heapq
import os
import statistics
import time

from studio.core.cluster.connection import Cluster
from studio.core.cluster.scan import split_units
from studio.core.models.data import load_data
from studio.core.models.load import load_model
from studio.core.scan.sensitivity import SensitivityScan
from studio.core.scan.types import ScanSettings

WORKERS = (1, 2, 4, 8, 12, 16, 32, 64)


def run_scan(model, data, settings, ray: bool, workers: int) -> tuple[SensitivityScan, float]:
    scan = SensitivityScan(
        model,
        data,
        settings,
        use_cache=False,
        workers=workers,
        ray_address="local" if ray else None,
    )
    start = time.perf_counter()
    scan.prepare()
    for _ in scan.run():
        pass
    return scan, time.perf_counter() - start


def largest_difference(a: SensitivityScan, b: SensitivityScan) -> float:
    rows = {(r.layer, r.ratio): r for r in b.report.rows}
    worst = 0.0
    for row in a.report.rows:
        other = rows[(row.layer, row.ratio)]
        for field in ("accuracy", "loss", "agreement", "kl"):
            x, y = getattr(row, field), getattr(other, field)
            if x is not None and y is not None:
                worst = max(worst, abs(x - y))
    return worst


def makespan(unit_seconds: list[float], workers: int) -> float:
    """The driver's schedule: units in order, each to the first worker that is free."""
    free = [0.0] * workers
    heapq.heapify(free)
    for seconds in unit_seconds:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--bandwidth", type=float, default=1.25e9, help="bytes/s off the head")
    args = parser.parse_args()
    model, data = load_model(args.model), load_data(args.data)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    settings = ScanSettings("structured", "accuracy", "exact", ratios, "l2", 256)
    load = os.getloadavg()[0]
    print(f"{model.name} on {data.name}: exact structured scan, {len(ratios)} ratios, ")
    print(f"{os.cpu_count()} cores, 1-minute load {load:.2f} at the start")

    here, here_s = run_scan(model, data, settings, ray=False, workers=os.cpu_count() or 1)
    start = time.perf_counter()
    Cluster.connect("local")
    connect_s = time.perf_counter() - start
    one, one_s = run_scan(model, data, settings, ray=True, workers=1)
    two, two_s = run_scan(model, data, settings, ray=True, workers=2)
    Cluster.shutdown()

    rows = len(here.report.rows)
    print(f"\nin-process exact scan ({os.cpu_count()} threads): {rows} rows in {here_s:.1f} s")
    diff = max(largest_difference(here, one), largest_difference(here, two))
    print(f"largest difference, Ray (1 and 2 workers) vs in-process: {diff:.2e}")
    s1, s2 = one.ray_stats, two.ray_stats
    units = [seconds for _, _, seconds in s1.units]
    prepare_here = one_s - s1.wall_seconds
    startup = max(s1.startup_seconds)  # the model is built from the 1-worker run alone
    busy = sum(units)
    overhead = max(0.0, (s1.wall_seconds - max(s1.startup_seconds) - busy) / len(units))
    print(f"local Ray start: {connect_s:.1f} s (once per session)")
    print(f"driver's prepare (targets, baseline, cache): {prepare_here:.1f} s")
    print(
        f"worker start-up (new process, imports, copy of model and data from the object store, "
        f"prepare): {startup:.2f} s with 1 worker, "
        f"{', '.join(f'{x:.2f}' for x in s2.startup_seconds)} s with 2; objects put once: "
        f"{s1.object_bytes / 1e6:.2f} MB"
    )
    print(
        f"units: {len(units)} (one target, {len(ratios)} ratios each): {busy:.1f} s in all, "
        f"slowest {max(units):.2f} s, median {statistics.median(units):.2f} s; driver overhead "
        f"{overhead * 1000:.0f} ms a unit"
    )
    print(
        f"Ray scan wall time: 1 worker {s1.wall_seconds:.1f} s, 2 workers {s2.wall_seconds:.1f} s"
        f": speed-up {s1.wall_seconds / s2.wall_seconds:.2f}x on this {os.cpu_count()}-core machine"
    )

    per_row = {name: (rows, seconds / rows) for name, rows, seconds in s1.units}

    def unit_times(n: int) -> list[float]:
        """The units the driver makes for ``n`` workers (split_units), timed from the
        1-worker run's per-row time of each target."""
        todo = [(name, list(range(rows))) for name, (rows, _) in per_row.items()]
        return [len(rows) * per_row[name][1] for name, rows in split_units(todo, n)]

    def model_time(n: int) -> tuple[float, str]:
        transfer = n * s1.object_bytes / args.bandwidth
        times = unit_times(n)
        span = makespan(times, n)
        units_name = "the slowest unit" if span <= max(times) * 1.0001 else "the units' work"
        parts = {"start-up": startup, "object transfer": transfer, units_name: span}
        total = startup + transfer + span + len(times) * overhead
        return total, max(parts, key=parts.get)

    predicted_two = model_time(2)[0]
    print(
        f"model check on this machine: predicted 2-worker time {predicted_two:.1f} s, "
        f"measured {s2.wall_seconds:.1f} s (2 workers share 2 cores with the driver here)"
    )
    base = model_time(1)[0]
    print(
        f"\nmodelled on a cluster of one-CPU workers ({args.bandwidth / 1e9:g} GB/s off the head)"
    )
    print(f"{'workers':>8} {'predicted s':>12} {'speed-up':>9} {'efficiency':>11}  bound by")
    for n in WORKERS:
        total, bound = model_time(n)
        print(f"{n:>8} {total:>12.1f} {base / total:>8.2f}x {base / total / n:>10.0%}  {bound}")
    finest = unit_times(10**6)
    print(
        f"\nWith fewer than two targets a worker, a target's ratios are split across units; at "
        f"one ratio a unit ({len(finest)} units) the slowest is {max(finest):.2f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
