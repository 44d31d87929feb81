"""The Latency tab's values: one :class:`Variant` per model of the session (the original,
each pruned and fine-tuned model) with what was measured and estimated of it, and their CSV
and log forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.core.latency.types import LatencyMeasurement, LayerTime
from studio.core.models.loaded import LoadedModel
from studio.core.plan.plan import PruningPlan
from studio.ui.widgets import charts


@dataclass
class Variant:
    """One model of the session, with what is known of its cost and quality."""

    name: str
    model: LoadedModel
    plan: PruningPlan | None
    params: int
    macs: int | None
    quality: float | None  # accuracy (or agreement) as a fraction
    measured: dict[tuple, LatencyMeasurement] = field(default_factory=dict)
    estimated: dict[tuple, float] = field(default_factory=dict)
    layers: dict[tuple, list[LayerTime]] = field(default_factory=dict)


def log_line(variants: list[Variant], key: tuple) -> str:
    """One log line: every variant measured (and estimated) with these settings."""
    parts = []
    for v in variants:
        m, est = v.measured.get(key), v.estimated.get(key)
        if m is not None:
            text = f"{v.name} {m.median_ms:.3f} ms measured"
            if est is not None:
                text += f" / {est:.3f} estimated"
            parts.append(text)
    runtime, batch, threads, device = key
    return f"Latency ({runtime}, batch {batch}, {threads} threads, {device}): " + "; ".join(parts)


def variants_csv(variants: list[Variant], key: tuple) -> str:
    """The table of variants with these settings, as CSV."""
    rows = []
    for v in variants:
        m, est = v.measured.get(key), v.estimated.get(key)
        rows.append(
            [
                v.name, v.params, v.macs or "", "" if v.quality is None else v.quality,
                *(("", "", "", "", "") if m is None else
                  (m.median_ms, m.p10_ms, m.p90_ms, m.quiet_ms, m.throughput)),
                "" if est is None else est, *key,
            ]
        )  # fmt: skip
    header = [
        "variant", "params", "macs", "quality", "measured_median_ms", "measured_p10_ms",
        "measured_p90_ms", "measured_quiet_ms", "throughput", "estimated_ms", "runtime",
        "batch", "threads", "device",
    ]  # fmt: skip
    return charts.csv_text(header, rows)


def quality_of(evaluation: Any) -> float | None:
    if evaluation is None:
        return None
    accuracy = getattr(evaluation, "accuracy", None)
    return accuracy if accuracy is not None else getattr(evaluation, "agreement", None)
