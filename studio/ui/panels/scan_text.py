"""How sensitivity results are written in the GUI: drops in points, hover texts, sort keys."""

from __future__ import annotations

import math

import numpy as np

from studio.core.scan.types import ScanReport, ScanRow, ScanTarget

# accuracy and agreement are fractions; the GUI shows their drops in percentage points
SCALE = {"accuracy": 100.0, "fidelity": 100.0, "loss": 1.0}
DROP_LABEL = {
    "accuracy": "accuracy drop (points)",
    "fidelity": "agreement drop (points)",
    "loss": "loss increase",
}
MAX_GROUP_NAMES = 6


def value_text(metric: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.2%}" if metric in ("accuracy", "fidelity") else f"{value:.4f}"


def drop_text(metric: str, drop: float) -> str:
    if math.isnan(drop):
        return "—"
    if metric == "loss":
        return f"{drop:+.4f}"
    return f"{drop * SCALE[metric]:+.2f} points"


def display_matrix(report: ScanReport, metric: str) -> tuple[list[str], list[float], np.ndarray]:
    """Targets x ratios of drops in display units (points for accuracy and agreement)."""
    names, ratios, grid = report.matrix(metric)
    return names, ratios, grid * SCALE[metric]


def sensitivity_order(grid: np.ndarray, descending: bool = True) -> list[int]:
    """Rows by mean drop over the measured ratios (unmeasured rows last, model order kept
    among equals)."""
    means = [float(np.nanmean(r)) if np.isfinite(r).any() else math.nan for r in grid]
    measured = [i for i, m in enumerate(means) if not math.isnan(m)]
    measured.sort(key=lambda i: -means[i] if descending else means[i])
    return measured + [i for i, m in enumerate(means) if math.isnan(m)]


def target_text(target: ScanTarget) -> str:
    layers = list(target.layers)
    shown = ", ".join(layers[:MAX_GROUP_NAMES])
    if len(layers) > MAX_GROUP_NAMES:
        shown += f", … ({len(layers) - MAX_GROUP_NAMES} more)"
    return f"layers: {shown}\n{target.size:,} units, {target.params:,} parameters"


def cell_text(
    report: ScanReport, metric: str, target: ScanTarget, row: ScanRow | None, ratio: float
) -> str:
    """The hover text of one heatmap cell."""
    head = f"{target.name} pruned by {ratio:g}"
    base = report.baseline
    shown_metric = "agreement" if metric == "fidelity" else metric
    base_value = base.agreement if metric == "fidelity" else getattr(base, metric)
    lines = [head, target_text(target)]
    if row is None:
        lines.append("not measured yet")
    elif row.error:
        lines.append(f"could not be measured: {row.error}")
    else:
        value = row.agreement if metric == "fidelity" else getattr(row, metric)
        kind = "estimated " if row.estimate else ""
        lines.append(
            f"{kind}{shown_metric} {value_text(metric, value)} "
            f"(baseline {value_text(metric, base_value)}), "
            f"change {drop_text(metric, report.drop(row, metric))}"
        )
        if not row.estimate and metric != "loss":
            lines.append(f"loss {row.loss:.4f}, KL {row.kl:.4g}")
    return "\n".join(lines)


def scan_summary(report: ScanReport) -> str:
    """``12 dependency groups × 9 ratios; baseline accuracy 99.17 %, loss 0.0116``."""
    rows = "dependency groups" if report.settings.mode == "structured" else "weight tensors"
    base = report.baseline
    quality = f"accuracy {base.accuracy:.2%}, " if base.accuracy is not None else ""
    text = (
        f"{len(report.targets)} {rows} × {len(report.settings.ratios)} ratios; "
        f"baseline {quality}loss {base.loss:.4f}"
    )
    if report.cached_rows:
        text += f"; {report.cached_rows} cells from the cache"
    return text
