"""The Planner's summary strip: parameters and MACs before and after, and the predicted drop."""

from __future__ import annotations

from typing import Any

from studio.core.plan.costs import CostModel
from studio.core.scan.types import ScanReport
from studio.ui import format as fmt
from studio.ui.panels import scan_text


def summary_parts(
    cost: CostModel, prediction: Any, report: ScanReport | None, method: str
) -> list[str]:
    """The strip's parts (rich text) for ``prediction`` (the plan's predicted costs and drop)."""
    parts = [
        f"<b>Parameters</b> {cost.params_before:,} → {prediction.params:,} "
        f"({prediction.params / max(cost.params_before, 1):.1%})",
        f"<b>MACs</b> {fmt.compact(cost.macs_before)} → {fmt.compact(prediction.macs)} "
        f"({prediction.macs / max(cost.macs_before, 1):.1%})",
    ]
    if prediction.drop is not None and report is not None:
        metric = report.settings.metric
        parts.append(
            f"<b>Predicted drop</b> {scan_text.drop_text(metric, prediction.drop)} "
            f"(sum of per-layer {metric} drops from the scan)"
        )
    else:
        parts.append(f"<b>Predicted drop</b>: run a {method} sensitivity scan")
    return parts
