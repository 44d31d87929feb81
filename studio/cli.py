"""Headless command line: ``studio info | eval | scan | prune | finetune | export | latency |
gui``. Uses studio.core only (the gui is imported lazily; ``prune`` lives in
:mod:`studio.cli_prune`, ``finetune`` in :mod:`studio.cli_finetune`, ``export`` in
:mod:`studio.cli_export`, ``latency`` in :mod:`studio.cli_latency`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from studio.core.errors import StudioError
from studio.core.isolation import note_step

# the same as studio.ui.main_window.TABS (the CLI does not import Qt to learn it)
GUI_TABS = ("layers", "sensitivity", "sparsity", "planner", "result", "training", "latency")


class TerminalProgress:
    """A one-line progress bar with ETA on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.monotonic()
        self.enabled = sys.stderr.isatty()
        self._last = -1.0
        self._message: str | None = None
        note_step(label)

    def __call__(self, fraction: float, message: str) -> None:
        if message != self._message:
            self._message = message
            note_step(f"{self.label}: {message}" if message else self.label)
        if not self.enabled or (fraction - self._last < 0.01 and fraction < 1.0):
            return
        self._last = fraction
        elapsed = time.monotonic() - self.start
        eta = f" ETA {elapsed / fraction - elapsed:4.0f}s" if 0.02 < fraction < 1.0 else ""
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:4.0%}{eta} {message[:30]:<30}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="SPEC",
        help="'demo', 'zoo:NAME' or a model file (.pt .pth .pt2 .onnx)",
    )
    p.add_argument("--arch", metavar="NAME", help="architecture of a state_dict file")
    p.add_argument("--input-shape", metavar="S", help="input shape, e.g. 1,3,32,32")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled model file to run code while loading (trusted files only)",
    )


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        metavar="SPEC",
        help="'demo', an image folder (one subfolder per class) or an .npz (x, y)",
    )
    p.add_argument("--image-size", metavar="HxW", help="resize images of a folder, e.g. 32x32")
    p.add_argument("--unlabeled", action="store_true", help="ignore labels (fidelity only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Pruning Studio (headless)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="layer inventory: shapes, parameters, MACs, groups")
    _add_model_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    ev = sub.add_parser("eval", help="accuracy and loss, or fidelity to a reference model")
    _add_model_args(ev)
    _add_data_args(ev)
    ev.add_argument("--reference", metavar="SPEC", help="reference model for fidelity")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    sc = sub.add_parser("scan", help="sensitivity scan: prune each layer alone, measure")
    _add_model_args(sc)
    _add_data_args(sc)
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
    from studio.cli_prune import add_prune_parser

    add_prune_parser(sub)
    from studio.cli_finetune import add_finetune_parser

    add_finetune_parser(sub)
    from studio.cli_export import add_export_parser

    add_export_parser(sub)
    from studio.cli_latency import add_latency_parser

    add_latency_parser(sub)
    from studio.cli_report import add_report_parser
    from studio.cli_view import add_view_parser

    add_report_parser(sub)
    add_view_parser(sub)
    gui = sub.add_parser("gui", help="open the studio window")
    _add_model_args(gui, required=False)
    _add_data_args(gui, required=False)
    gui.add_argument(
        "--screenshot", metavar="FILE.png", help="load, render the window to FILE.png and exit"
    )
    gui.add_argument("--tab", choices=GUI_TABS, help="the tab to show first")
    gui.add_argument("--recipe", metavar="FILE.yaml", help="load a pruning recipe into the Planner")
    gui.add_argument("--apply", action="store_true", help="apply the --recipe once data is in")
    gui.add_argument(
        "--finetune",
        type=int,
        metavar="EPOCHS",
        help="fine-tune the pruned model for EPOCHS in the Training tab once a plan is applied",
    )
    gui.add_argument(
        "--latency",
        action="store_true",
        help="measure every variant's latency (after --apply/--finetune) in the Latency tab",
    )
    gui.add_argument(
        "--scan",
        action="store_true",
        help="start a sensitivity scan (exact, structured) once the model and data are loaded",
    )
    gui.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run scans and fine-tuning on Ray for this session (as Settings > Compute)",
    )
    gui.add_argument("--workers", type=int, help="Ray workers (with --ray)")
    return parser


def _load(args: argparse.Namespace, spec: str | None = None):
    from studio.core.models import load_model, parse_shape

    progress = TerminalProgress("loading")
    progress(0.0, spec or args.model)
    model = load_model(
        spec or args.model,
        arch=args.arch,
        input_shape=parse_shape(args.input_shape),
        trust_pickle=args.trust_pickle,
    )
    progress(1.0, "")
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    return model


def _load_data(args: argparse.Namespace):
    from studio.core.data import load_data
    from studio.core.models import parse_shape

    size = parse_shape(args.image_size) if args.image_size else None
    if size is not None and len(size) != 2:
        raise StudioError(f"--image-size takes HxW, got {args.image_size}")
    return load_data(args.data, image_size=size, unlabeled=args.unlabeled)  # type: ignore[arg-type]


def cmd_info(args: argparse.Namespace) -> int:
    from studio.core.inventory import build_inventory

    model = _load(args)
    inventory = build_inventory(model, progress=TerminalProgress("inspecting"))
    if args.json:
        print(json.dumps(inventory.to_dict()))
        return 0
    print(f"{inventory.model_name}  [{model.kind}]  input {inventory.input_shape}")
    print(
        f"{'layer':<32} {'type':<18} {'output':<18} {'params':>10} {'MACs':>12} "
        f"{'sparsity':>8}  group / reason"
    )
    for layer in inventory.layers:
        shape = "x".join(str(d) for d in layer.output_shape) if layer.output_shape else "?"
        where = f"G{layer.group}" if layer.group is not None else layer.reason
        print(
            f"{layer.name:<32} {layer.type:<18} {shape:<18} {layer.params:>10,} "
            f"{layer.macs:>12,} {layer.sparsity:>8.1%}  {where}"
        )
    print(
        f"total: {inventory.params:,} parameters, {inventory.macs:,} MACs, "
        f"{len(inventory.groups)} dependency groups, sparsity {inventory.sparsity:.1%}"
    )
    if inventory.graph_error:
        print(f"structural pruning unavailable: {inventory.graph_error}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from studio.core.evaluate import evaluate

    model = _load(args)
    data = _load_data(args)
    reference = _load(args, args.reference).module if args.reference else None
    result = evaluate(
        model.module,
        data,
        reference=reference,
        batch_size=args.batch_size,
        progress=TerminalProgress("evaluating"),
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{model.name} on {data.name} ({result.samples} samples)")
    for key, value in result.to_dict().items():
        if value is not None and key != "samples":
            print(f"  {key:<9} {value:.4f}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from studio.core.files import write_atomic
    from studio.core.sensitivity import SensitivityScan
    from studio.core.sensitivity_types import ScanSettings

    model = _load(args)
    data = _load_data(args)
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
        from studio.core.cluster import check_address, require_ray

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
        protected = tuple(p for p in (model.path, _path(args.data)) if p is not None)
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


def _path(spec: str | None):
    from pathlib import Path

    return Path(spec) if spec and Path(spec).exists() else None


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


def cmd_gui(args: argparse.Namespace) -> int:
    from studio.ui.app import run_gui

    return run_gui(
        args.model,
        args.data,
        screenshot=args.screenshot,
        tab=args.tab,
        scan=args.scan,
        recipe=args.recipe,
        apply=args.apply,
        finetune=args.finetune,
        latency=args.latency,
        compute=_compute(args),
    )


def _compute(args: argparse.Namespace):  # -> Compute | None
    from studio.core.cluster import Compute, check_address, require_ray

    if args.workers is not None and not args.ray:
        raise StudioError("--workers needs --ray ADDRESS")
    if args.workers is not None and args.workers < 1:
        raise StudioError(f"workers must be at least 1, got {args.workers}")
    if not args.ray:
        return None
    require_ray()
    return Compute(check_address(args.ray), args.workers)


def cmd_prune(args: argparse.Namespace) -> int:
    from studio.cli_prune import cmd_prune as run

    return run(args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from studio.cli_finetune import cmd_finetune as run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from studio.cli_export import cmd_export as run

    return run(args)


def cmd_latency(args: argparse.Namespace) -> int:
    from studio.cli_latency import cmd_latency as run

    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from studio.cli_report import cmd_report as run

    return run(args)


def cmd_view(args: argparse.Namespace) -> int:
    from studio.cli_view import cmd_view as run

    return run(args)


COMMANDS = {
    "info": cmd_info,
    "eval": cmd_eval,
    "scan": cmd_scan,
    "prune": cmd_prune,
    "finetune": cmd_finetune,
    "export": cmd_export,
    "latency": cmd_latency,
    "report": cmd_report,
    "view": cmd_view,
    "gui": cmd_gui,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    before = _ray_connection()
    try:
        return COMMANDS[args.command](args)
    except StudioError as exc:
        print(f"studio: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, the traceback only on request
        if os.environ.get("STUDIO_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"studio: unexpected error: {type(exc).__name__}: {first} "
            "(set STUDIO_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if _ray_connection() is not before:  # Ray started or joined for this command
            sys.modules["studio.core.cluster"].Cluster.shutdown()


def _ray_connection() -> object:
    cluster = sys.modules.get("studio.core.cluster")
    return cluster.Cluster._current if cluster is not None else None
