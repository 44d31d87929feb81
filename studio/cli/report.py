"""``studio report``: the pruning report as one self-contained HTML file, or a PDF.

The HTML comes from :mod:`studio.core.export.report`. A .pdf is printed by Qt
(:mod:`studio.ui.report_pdf`, imported only for .pdf: besides `studio gui`, the one place
the CLI touches Qt).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from studio.cli.common import (
    add_data_args,
    add_model_args,
    existing_path,
    load_data_arg,
    load_model_arg,
)
from studio.core.errors import StudioError


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """The ``report`` subcommand's arguments."""
    rp = sub.add_parser("report", help="a self-contained HTML (or PDF) report of a pruned model")
    add_model_args(rp)
    rp.add_argument(
        "--original",
        metavar="SPEC",
        help="the unpruned model (default: the built-in architecture unpruned, for pruned "
        "built-in models)",
    )
    add_data_args(rp, required=False)
    rp.add_argument("--scan", metavar="FILE.json", help="a scan from `studio scan --out x.json`")
    rp.add_argument("--recipe", metavar="FILE", help="the plan (recipe .yaml/.json)")
    rp.add_argument(
        "--history", metavar="FILE.csv", help="training records (`studio finetune --history`)"
    )
    rp.add_argument("--out", required=True, metavar="FILE.html|FILE.pdf")
    rp.add_argument("--no-latency", action="store_true", help="do not measure ONNX Runtime latency")
    rp.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``studio report``."""
    from studio.core.export.exporter import unpruned_architecture
    from studio.core.export.report import (
        ReportData,
        history_from_csv,
        layer_shapes,
        render_html,
        summary_rows,
        write_report,
    )
    from studio.core.models.inventory import build_inventory
    from studio.core.plan.plan import PruningPlan
    from studio.core.scan.types import ScanReport

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".pdf"):
        raise StudioError(f"--out must end in .html or .pdf, got {args.out}")
    history = []
    if args.history:
        history = history_from_csv(_read(args.history))
    plan = PruningPlan.load(args.recipe) if args.recipe else None
    scan = ScanReport.from_dict(json.loads(_read(args.scan)), args.scan) if args.scan else None
    model = load_model_arg(args)
    original = (
        load_model_arg(args, args.original) if args.original else unpruned_architecture(model)
    )
    data = load_data_arg(args) if args.data else None
    inputs = (
        model.path,
        original and original.path,
        existing_path(args.data),
        existing_path(args.scan),
    )
    protected = tuple(
        p for p in (*inputs, existing_path(args.recipe), existing_path(args.history)) if p
    )
    after = build_inventory(model)
    before = build_inventory(original) if original is not None and original is not model else None
    report = ReportData(
        title=f"Pruning report: {model.name}",
        model_name=model.name,
        summary=summary_rows(before, after),
        plan=plan,
        scan=scan,
        history=history,
    )
    if original is not None and original is not model:
        report.shapes = layer_shapes(original.module, model.module)
        if args.original is None:
            report.notes.append(
                f"The original is the unpruned {model.arch} architecture with random weights: "
                "its size, MACs and latency are right, its accuracy is not measured."
            )
    if data is not None:
        report.quality = _quality(model, original if args.original else None, data)
    if not args.no_latency and original is not None:
        report.export = _measure(model, original, protected)
    html_text = render_html(report)
    if suffix == ".pdf":
        from studio.ui.report_pdf import html_to_pdf

        html_to_pdf(html_text, out, protected)
    else:
        write_report(html_text, out, protected)
    summary = {
        "out": str(out),
        "format": "pdf" if suffix == ".pdf" else "html",
        "bytes": out.stat().st_size,
        "params": after.params,
        "params_original": before.params if before else None,
        "macs": after.macs,
        "macs_original": before.macs if before else None,
        "ort_ms_original": report.export.ort_ms_original if report.export else None,
        "ort_ms_pruned": report.export.ort_ms_exported if report.export else None,
        "sections": {
            "plan": plan is not None,
            "scan": scan is not None,
            "training": bool(history),
            "quality": bool(report.quality),
        },
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out} ({summary['bytes']:,} bytes)")
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StudioError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _quality(model, original, data) -> list:  # -> list[tuple[str, EvalResult]]
    from studio.core.models.evaluate import evaluate

    unlabeled = data.y is None
    rows = []
    if original is not None and not unlabeled:
        rows.append(("Original", evaluate(original.module, data)))
    reference = original.module if original is not None else None
    if unlabeled and reference is None:
        return rows  # nothing to score against
    rows.append((model.name, evaluate(model.module, data, reference=reference)))
    return rows


def _measure(model, original, protected):  # -> ExportResult | None
    """ONNX Runtime latency of the original and the model, through a temporary export."""
    from studio.core.export.exporter import export_model

    with tempfile.TemporaryDirectory(prefix="studio-report-") as folder:
        result = export_model(
            model,
            "onnx",
            Path(folder) / "model.onnx",
            original=original if original is not model else None,
            protected=protected,
        )
    return result
