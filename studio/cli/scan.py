"""``studio scan``: a sensitivity scan (exact, naive or Taylor; in-process or on Ray), printed
as a table and written as CSV or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time

import studio.cli.hf as hf
from studio.cli.common import (
    TerminalProgress,
    add_data_args,
    add_model_args,
    calibration_arg,
    existing_path,
    load_data_arg,
    load_model_arg,
)
from studio.core.errors import StudioError


def add_scan_parser(sub: argparse._SubParsersAction) -> None:
    sc = sub.add_parser("scan", help="sensitivity scan: prune each layer alone, measure")
    add_model_args(sc)
    add_data_args(sc)
    sc.add_argument("--mode", default="structured", choices=("structured", "unstructured", "nm"))
    sc.add_argument(
        "--ratios",
        metavar="R,R,...",
        help="fractions to prune (default 0.1..0.9; nm: 0.25,0.5,0.75)",
    )
    sc.add_argument(
        "--metric",
        choices=("accuracy", "loss", "fidelity"),
        help="default: accuracy with labels, fidelity without, loss for taylor",
    )
    sc.add_argument("--method", default="exact", choices=("exact", "naive", "taylor"))
    sc.add_argument("--criterion", default="l2", choices=("l1", "l2", "apoz", "activation"))
    sc.add_argument("--batch-size", type=int, default=256)
    sc.add_argument(
        "--workers",
        type=int,
        help="threads for exact scans (default: all cores); with --ray, Ray workers "
        "(default: the cluster's CPUs)",
    )
    sc.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray: local (start one on this machine), auto (the cluster this machine "
        "joined), ray://HOST:PORT or HOST:PORT",
    )
    sc.add_argument("--no-cache", action="store_true", help="measure everything again")
    sc.add_argument("--out", metavar="FILE.csv|FILE.json", help="write the table")
    sc.add_argument("--json", action="store_true", help="print a JSON summary")


def cmd_scan(args: argparse.Namespace) -> int:
    from studio.core.files import write_atomic
    from studio.core.scan.sensitivity import SensitivityScan
    from studio.core.scan.types import ScanSettings

    model = load_model_arg(args)
    data = load_data_arg(args)
    if hf.is_hf(model):  # heads, MLP neurons and layers
        return _scan_hf(args, model, data)
    metric = args.metric or (
        "loss" if args.method == "taylor" else "accuracy" if data.labelled else "fidelity"
    )
    if args.ratios:
        try:
            ratios = tuple(float(r) for r in args.ratios.split(",") if r.strip())
        except ValueError:
            raise StudioError(
                f"bad --ratios {args.ratios!r}: expected numbers like 0.1,0.5"
            ) from None
    else:
        ratios = ScanSettings.default_ratios(args.mode)
    settings = ScanSettings(args.mode, metric, args.method, ratios, args.criterion, args.batch_size)
    if args.out and not args.out.lower().endswith((".csv", ".json")):
        raise StudioError(f"--out must end in .csv or .json, got {args.out}")
    if args.ray:  # checked now; Ray is started or joined once there are rows to measure
        from studio.core.cluster import scan as _ray_scan  # noqa: F401 - registers the strategy
        from studio.core.cluster.connection import check_address, require_ray

        require_ray()
        check_address(args.ray)
        if settings.method == "taylor":
            print("taylor is one gradient pass: it runs in this process", file=sys.stderr)
    job = SensitivityScan(
        model,
        data,
        settings,
        use_cache=not args.no_cache,
        workers=args.workers,
        ray_address=args.ray,
    )
    job.prepare(progress=TerminalProgress("preparing"))
    started = time.monotonic()
    for _ in job.run(progress=TerminalProgress("scanning")):
        pass
    seconds = time.monotonic() - started
    result = job.report
    assert result is not None
    order = {t.name: i for i, t in enumerate(result.targets)}
    result.rows.sort(key=lambda r: (order.get(r.layer, len(order)), r.ratio))
    if args.out:
        protected = tuple(p for p in (model.path, existing_path(args.data)) if p is not None)
        if args.out.lower().endswith(".csv"):
            write_atomic(args.out, result.to_csv(metric), protected)
        else:
            write_atomic(args.out, json.dumps(_scan_json(result, metric), indent=1), protected)
    names, ratio_list, grid = result.matrix(metric)
    summary = {
        "method": settings.method,
        "mode": settings.mode,
        "metric": metric,
        "seconds": round(seconds, 3),
        "rows": len(result.rows),
        "cached_rows": result.cached_rows,
        "targets": len(result.targets),
        "baseline": result.baseline.value(metric),
        "failed": sum(1 for r in result.rows if r.error),
        "out": args.out,
        "ran_on": job.ray_stats.where if job.ray_stats is not None else "this process",
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{settings.method} {settings.mode} scan of {model.name} on {data.name}: "
        f"{metric} baseline {summary['baseline']:.4f}, drop per ratio"
        f"{' (estimated)' if settings.method == 'taylor' else ''}"
    )
    print(f"{'layer / group':<32}" + "".join(f"{r:>8g}" for r in ratio_list))
    for name, row in zip(names, grid):
        print(f"{name:<32}" + "".join(f"{v:>8.4f}" for v in row))
    print(f"{len(result.rows)} rows in {seconds:.1f}s ({result.cached_rows} from the cache)")
    if job.ray_stats is not None:
        stats = job.ray_stats
        print(f"ran on {stats.where} with {stats.workers} worker{'s' * (stats.workers > 1)}")
    return 0


def _scan_hf(args: argparse.Namespace, model, data) -> int:
    from studio.core.files import write_atomic

    if args.out and not args.out.lower().endswith((".csv", ".json")):
        raise StudioError(f"--out must end in .csv or .json, got {args.out}")
    report = hf.scan(args, model, data, use_cache=not args.no_cache)
    if args.out:
        text = (
            report.to_csv() if args.out.lower().endswith(".csv") else json.dumps(report.to_dict())
        )
        write_atomic(args.out, text, hf.protected_inputs(args, model))
    hf.print_scan(report, model, calibration_arg(args) or data, args.json)
    return 0


def _scan_json(result, metric: str) -> dict:
    return {
        "settings": {
            k: getattr(result.settings, k)
            for k in ("mode", "metric", "method", "ratios", "criterion", "batch_size")
        },
        "metric": metric,
        "baseline": result.baseline.to_dict(),
        "targets": [t.__dict__ for t in result.targets],
        "rows": [dict(r.to_dict(), drop=result.drop(r, metric)) for r in result.rows],
    }
