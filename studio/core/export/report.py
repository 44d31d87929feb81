"""The pruning report: one self-contained HTML file (images embedded as data URIs).

Sections, each only where its data is there: the model before and after (parameters, MACs,
layers), quality before and after, the plan (method, criterion, ratio per target), the
sensitivity heatmap (:mod:`studio.core.export.report_charts`), the before/after table per layer,
latency measured (ONNX Runtime, from an export) and estimated (device profiles), INT8 beside
float, and the training curves. Nothing in the file refers to anything outside it.
The GUI and ``studio report`` fill a :class:`ReportData` and call :func:`render_html`; the PDF
is made from the same HTML by :mod:`studio.ui.report_pdf`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from studio.core.export.report_charts import curves_png, data_uri, heatmap_png
from studio.core.files import write_atomic
from studio.core.train.types import TrainRecord

Shape = tuple[int, ...] | None
STYLE = """
body { font-family: "Segoe UI", "DejaVu Sans", Arial, sans-serif; font-size: 13px;
       color: #1b1f24; margin: 24px; max-width: 1100px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 26px;
     border-bottom: 1px solid #d0d7de; padding-bottom: 3px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; }
th { background: #f0f3f6; } td.l, th.l { text-align: left; white-space: nowrap; }
.muted { color: #57606a; } .gone { color: #b00020; } img { margin: 6px 8px 6px 0; }
"""


@dataclass
class ReportData:
    """Everything a report can show; leave out what there is not."""

    title: str
    model_name: str
    summary: list[tuple[str, str, str]] = field(default_factory=list)  # (what, before, after)
    quality: list[tuple[str, Any]] = field(default_factory=list)  # (label, EvalResult)
    plan: Any = None  # PruningPlan
    scan: Any = None  # ScanReport
    shapes: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    history: list[TrainRecord] = field(default_factory=list)
    export: Any = None  # ExportResult
    quantized: Any = None  # QuantizeResult
    measured_ms: Mapping[str, float] = field(default_factory=dict)  # label -> ms
    estimated_ms: Mapping[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def summary_rows(before: Any, after: Any) -> list[tuple[str, str, str]]:
    """(what, before, after) from two inventories (either may be None)."""

    def cells(get: Any, fmt: str) -> tuple[str, str]:
        return tuple(format(get(i), fmt) if i is not None else "—" for i in (before, after))  # type: ignore[return-value]

    rows = [
        ("Parameters", *cells(lambda i: i.params, ",")),
        ("MACs", *cells(lambda i: i.macs, ",")),
        ("Layers", *cells(lambda i: len(i.layers), ",")),
        ("Sparsity (zero weights)", *cells(lambda i: i.sparsity, ".2%")),
    ]
    if before is not None and after is not None and after.params and after.macs:
        rows.append(("Compression", "", f"{before.params / after.params:.2f}× parameters"))
        rows.append(("MACs reduction", "", f"{before.macs / after.macs:.2f}× fewer"))
    return rows


def layer_shapes(
    original: torch.nn.Module, pruned: torch.nn.Module
) -> list[tuple[str, Shape, Shape]]:
    """Weight shape of every layer of ``original`` and of the same-named layer after pruning
    (None where the layer was removed)."""
    after = {n: tuple(m.weight.shape) for n, m in pruned.named_modules() if _weight(m)}
    return [
        (name, tuple(m.weight.shape), after.get(name))
        for name, m in original.named_modules()
        if _weight(m)
    ]


def _weight(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2


def history_from_csv(text: str) -> list[TrainRecord]:
    """Training records from the CSV ``studio finetune --history`` (and the Training tab) write."""
    kinds = {f.name: f.type for f in fields(TrainRecord)}
    records = []
    for row in csv.DictReader(io.StringIO(text)):
        values: dict[str, Any] = {}
        for name, raw in row.items():
            if name not in kinds:
                continue
            kind = str(kinds[name])
            if raw in ("", None):
                values[name] = None
            elif kind.startswith("str"):
                values[name] = raw
            elif kind.startswith("bool"):
                values[name] = raw.strip().lower() in ("true", "1")
            elif kind.startswith("int"):
                values[name] = int(float(raw))
            else:
                values[name] = float(raw)
        records.append(TrainRecord.from_dict(values))
    return records


def render_html(data: ReportData) -> str:
    """The report as one HTML document with its images inline."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(data.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(data.title)}</h1>",
        f'<p class="muted">{_e(data.model_name)} · Pruning Studio report · {stamp}</p>',
    ]
    if data.summary:
        parts.append("<h2>Model</h2>")
        parts.append(_table(("", "Before", "After"), data.summary))
    if data.quality:
        parts.append("<h2>Quality</h2>")
        parts.append(_quality(data.quality))
    if data.plan is not None:
        parts.append(_plan(data.plan))
    if data.scan is not None:
        parts.append(_scan(data.scan))
    if data.shapes:
        parts.append(_layers(data.shapes, data.plan))
    latency = _latency(data)
    if latency:
        parts.append(latency)
    if data.history:
        parts.append(_training(data.history))
    if data.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts.extend(f"<li>{_e(n)}</li>" for n in data.notes)
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(html_text: str, path: str | Path, protected: tuple[Path, ...] = ()) -> Path:
    """Write the HTML atomically (never over an input file)."""
    return write_atomic(path, html_text, protected)


# --- sections ------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text))


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    out = ["<table><tr>"]
    out += [
        f'<th class="l">{_e(h)}</th>' if i == 0 else f"<th>{_e(h)}</th>" for i, h in enumerate(head)
    ]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            out.append(f'<td class="l">{cell}</td>' if i == 0 else f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _num(value: float | None, fmt: str) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, fmt)
    )


def _quality(quality: list[tuple[str, Any]]) -> str:
    rows = [
        (
            _e(label),
            _num(q.accuracy, ".2%"),
            _num(q.loss, ".4f"),
            _num(q.agreement, ".2%"),
            f"{q.samples:,}",
        )
        for label, q in quality
        if q is not None
    ]
    return _table(("Model", "Accuracy", "Loss", "Agreement with the original", "Samples"), rows)


def _plan(plan: Any) -> str:
    head = (
        f"<h2>Plan</h2><p>Method <b>{_e(plan.method)}</b>, criterion <b>{_e(plan.criterion)}</b>"
        f", cap {plan.cap:.0%}"
    )
    if plan.target:
        head += ", target " + _e(", ".join(f"{k} {v}" for k, v in plan.target.items()))
    head += "</p>"
    rows = [(_e(name), f"{ratio:.1%}") for name, ratio in plan.ratios.items() if ratio > 0]
    skipped = len(plan.ratios) - len(rows)
    body = _table(("Target (group)", "Ratio"), rows) if rows else "<p>No target is pruned.</p>"
    if skipped:
        body += f'<p class="muted">{skipped} targets at ratio 0 are not listed.</p>'
    if plan.ignored:
        body += f'<p class="muted">Ignored: {_e(", ".join(plan.ignored))}</p>'
    return head + body


def _scan(scan: Any) -> str:
    names, ratios, grid = scan.matrix()
    s = scan.settings
    metric = s.metric
    text = (
        f"<h2>Sensitivity</h2><p>{_e(s.mode)} pruning of each target alone ({_e(s.method)}, "
        f"{_e(s.criterion)}); cell = drop in {_e(metric)} from the baseline "
        f"{scan.baseline.value(metric):.4f}.</p>"
    )
    if not names:
        return text + "<p>No targets were scanned.</p>"
    png = heatmap_png(names, ratios, grid)
    return text + f'<img alt="sensitivity heatmap" src="{data_uri(png)}">'


def _layers(shapes: list[tuple[str, Shape, Shape]], plan: Any) -> str:
    ratios = dict(plan.ratios) if plan is not None else {}
    rows = []
    for name, before, after in shapes:
        n_before = math.prod(before) if before else 0
        if after is None:
            cells = ('<span class="gone">removed</span>', "0", "100%")
        else:
            n_after = math.prod(after)
            gone = 1 - n_after / n_before if n_before else 0.0
            cells = ("×".join(map(str, after)), f"{n_after:,}", f"{gone:.0%}")
        ratio = ratios.get(name)
        rows.append(
            (
                _e(name),
                "×".join(map(str, before or ())),
                cells[0],
                f"{n_before:,}",
                cells[1],
                cells[2],
                "" if ratio is None else f"{ratio:.0%}",
            )
        )
    head = ("Layer", "Weight before", "Weight after", "Weights before", "After", "Removed", "Plan")
    return "<h2>Layers before and after</h2>" + _table(head, rows)


def _latency(data: ReportData) -> str:
    rows: list[tuple[str, str, str]] = []
    ex, q = data.export, data.quantized
    if ex is not None and ex.ort_ms_exported is not None:
        if ex.ort_ms_original is not None:
            rows.append(
                (
                    _e(f"Original ({ex.original_name or 'unpruned'})"),
                    f"{ex.ort_ms_original:.3f}",
                    "measured, ONNX Runtime",
                )
            )
        rows.append(
            (
                _e(f"Exported {Path(ex.path).name}"),
                f"{ex.ort_ms_exported:.3f}",
                "measured, ONNX Runtime",
            )
        )
    if q is not None and q.ort_ms_int8 is not None:
        rows.append(
            (
                _e(f"INT8 ({q.mode}) {Path(q.path).name}"),
                f"{q.ort_ms_int8:.3f}",
                "measured, ONNX Runtime",
            )
        )
    rows += [(_e(k), f"{v:.3f}", "measured") for k, v in data.measured_ms.items()]
    rows += [(_e(k), f"{v:.3f}", "estimated") for k, v in data.estimated_ms.items()]
    if not rows:
        return ""
    out = "<h2>Latency</h2>" + _table(("Model", "ms (batch 1, median)", "How"), rows)
    if ex is not None and ex.speedup:
        out += f"<p>Measured speed-up of the export: <b>{ex.speedup:.2f}×</b>.</p>"
    if ex is not None:
        out += (
            f"<p>Export check: {ex.params:,} parameters in the file ({ex.params_model:,} in the "
            f"model), largest output difference {ex.max_abs_diff:.2g}, {ex.bytes:,} bytes.</p>"
        )
    if q is not None:
        out += "<h2>INT8</h2>" + _table(
            ("", "Float", "INT8"),
            [
                ("Size (bytes)", f"{q.bytes_float:,}", f"{q.bytes_int8:,}"),
                ("Accuracy", _num(q.accuracy_float, ".2%"), _num(q.accuracy_int8, ".2%")),
                (
                    "Agreement with the original",
                    _num(q.agreement_float_reference, ".2%"),
                    _num(q.agreement_int8_reference, ".2%"),
                ),
                ("ONNX Runtime ms", _num(q.ort_ms_float, ".3f"), _num(q.ort_ms_int8, ".3f")),
            ],
        )  # fmt: skip
    return out


def _training(history: list[TrainRecord]) -> str:
    steps = [r for r in history if r.kind == "step"] or history
    epochs = [r for r in history if r.kind != "step"]
    loss = curves_png(
        "Training loss", [("loss", [r.epoch for r in steps], [r.loss for r in steps])], "epoch"
    )
    series = []
    for label, attr in (("val accuracy", "val_accuracy"), ("agreement", "agreement")):
        values = [(r.epoch, getattr(r, attr)) for r in epochs if getattr(r, attr) is not None]
        if values:
            series.append((label, [v[0] for v in values], [v[1] for v in values]))
    out = "<h2>Training</h2>" + f'<img alt="training loss" src="{data_uri(loss)}">'
    if series:
        png = curves_png("Validation", series, "epoch")
        out += f'<img alt="validation" src="{data_uri(png)}">'
    best = [r for r in epochs if r.is_best]
    if best:
        b = best[-1]
        acc, agree = _num(b.val_accuracy, ".2%"), _num(b.agreement, ".2%")
        out += f"<p>Best epoch {b.epoch:g}: validation accuracy {acc}, agreement {agree}.</p>"
    return out
