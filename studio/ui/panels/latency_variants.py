"""The Latency tab's values: one :class:`Variant` per model of the session (the original,
each pruned and fine-tuned model) with what was measured and estimated of it, and their CSV
and log forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.core.latency.types import DeviceEstimate, LatencyMeasurement, LayerTime
from studio.core.models.loaded import LoadedModel
from studio.core.plan.plan import PruningPlan
from studio.ui import format as fmt
from studio.ui.widgets import charts

# the Latency tab's table: short headers (so that it fits the tab at 1280x800), each with the
# full meaning in its tooltip
COLUMNS = (
    "Variant",
    "Params",
    "MACs",
    "Quality",
    "Measured ms",
    "Quiet ms",
    "Samples/s",
    "Est. ms",
    "Est. error",
    "Device ms",
    "Energy mJ",
    "Memory-bound",
)
HEADER_TIPS = {
    "Params": "Parameters",
    "MACs": "Multiply-accumulates per sample",
    "Quality": "Accuracy on the data (or agreement with the original without labels)",
    "Measured ms": "Median latency measured on this machine, and the speed-up over the "
    "original\n(hover a cell for the 10th–90th percentile range)",
    "Quiet ms": "The median of the fastest block of 10 runs: the latency on an undisturbed "
    "machine,\nwhich the estimate predicts (on a shared machine the median of all runs is "
    "higher)",
    "Samples/s": "Throughput at the median latency",
    "Est. ms": "Latency estimated from the lookup table, without running the model",
    "Est. error": "The estimate's error against the quiet measurement",
    "Device ms": "Latency on the target device (estimated from its roofline)",
    "Energy mJ": "Energy per inference on the target device (estimated)",
    "Memory-bound": "Layers bound by memory traffic on the target device, of all layers",
}
DEVICE_COLUMNS = ("Device ms", "Energy mJ", "Memory-bound")  # shown with a target device


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


def table_row(
    v: Variant, key: tuple, base: LatencyMeasurement | None, device: tuple[str, str, str]
) -> tuple[str, ...]:
    """The table's cells for ``v`` (one per :data:`COLUMNS`) with the settings ``key``; with
    ``base`` (the original's measurement) the measured cell gives the speed-up over it."""
    m, est = v.measured.get(key), v.estimated.get(key)
    measured = f"{m.median_ms:.3f}" if m is not None else ""
    if m is not None and base is not None:
        measured += f"  {base.median_ms / m.median_ms:.2f}×"
    calm = (m.quiet_ms or m.median_ms) if m is not None else 0.0
    error = f"{(est - calm) / calm:+.1%}" if m and est else ""
    return (
        v.name,
        fmt.thousands(v.params),
        fmt.compact(v.macs) if v.macs else fmt.DASH,
        fmt.percent(v.quality, 2) if v.quality is not None else fmt.DASH,
        measured,
        f"{m.quiet_ms:.3f}" if m is not None and m.quiet_ms else "",
        f"{m.throughput:,.0f}" if m is not None else "",
        f"{est:.3f}" if est is not None else "",
        error,
        *device,
    )


def row_tips(
    v: Variant, key: tuple, base: LatencyMeasurement | None, device_error: str = ""
) -> dict[int, str]:
    """Tooltips of a row's cells by column: the whole name (the cell may elide it), the
    spread of the measured runs, and why the target device could not be estimated."""
    tips = {0: v.name}
    m = v.measured.get(key)
    if m is not None:
        tips[COLUMNS.index("Measured ms")] = (
            f"median {m.median_ms:.3f} ms, 10th–90th percentile "
            f"{m.p10_ms:.3f}–{m.p90_ms:.3f} ms over {m.runs} runs"
        )
        if base is not None:
            tips[COLUMNS.index("Measured ms")] += (
                f"\n{base.median_ms / m.median_ms:.2f}× the speed of the original"
            )
    if device_error:
        tips[COLUMNS.index(DEVICE_COLUMNS[0])] = device_error
    return tips


def pareto_points(
    variants: list[Variant], key: tuple, by_latency: bool
) -> tuple[list[str], list[float], list[float], str]:
    """Names, costs, qualities and the cost's axis label of the variants that have both a
    quality and the cost: measured latency in ms, or MACs in millions."""
    points = [
        (v.name, v.measured[key].median_ms if by_latency else v.macs / 1e6, v.quality)
        for v in variants
        if v.quality is not None and (v.measured.get(key) is not None if by_latency else v.macs)
    ]
    label = "latency (ms, measured)" if by_latency else "MACs (millions)"
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points], label


def pruned_variant(result: Any, variants: list[Variant]) -> Variant:
    """The variant of a pruning result (a PruneResult), numbered after the pruned ones so far."""
    count = sum(1 for v in variants if v.name.startswith("pruned"))
    return Variant(
        f"pruned {count + 1}",
        result.model,
        result.plan,
        result.params_after,
        result.macs_after,
        quality_of(result.quality_after),
    )


def finetuned_variant(result: Any, pruned: Any, variants: list[Variant]) -> Variant:
    """The variant of a fine-tuning result, named and planned after the pruned variant it
    started from (``pruned``: the session's PruneResult)."""
    source = next(
        (v for v in reversed(variants) if pruned is not None and v.model is pruned.model), None
    )
    name = f"{source.name} fine-tuned" if source is not None else "fine-tuned"
    quality = result.accuracy_after if result.accuracy_after is not None else None
    quality = quality if quality is not None else result.agreement_after
    return Variant(
        name,
        result.model,
        source.plan if source is not None else None,
        result.params,
        source.macs if source is not None else None,
        quality,
    )


def device_cells(estimate: DeviceEstimate | None) -> tuple[str, str, str]:
    """The target-device cells: estimated ms, energy, and how many layers are memory-bound."""
    if estimate is None:
        return ("", "", "")
    memory = sum(1 for layer in estimate.layers if layer.bound == "memory")
    return (
        f"{estimate.total_ms:.3f}",
        f"{estimate.energy_mj:.4f}",
        f"{memory} of {len(estimate.layers)}",
    )
