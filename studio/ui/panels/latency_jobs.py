"""What the Latency tab runs in the background, as plain generators (in the job's process):
measuring the variants, then estimating them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, sub_progress
from studio.core.latency.fit import quiet_side_by_side
from studio.core.latency.measure import measure_latency, profile_layers
from studio.core.plan.plan import PruningPlan
from studio.ui.panels.latency_variants import Variant


def measure_variants(
    variants: list[Variant],
    todo: list[Variant],
    key: tuple,
    budget: float,
    progress: ProgressFn,
    cancel: CancelToken,
) -> Iterator[Any]:
    """The Latency tab's measuring job: ``todo`` measured with the settings ``key`` (runtime,
    batch, threads, device), then the quiet figures of every measured variant from interleaved
    passes, then the estimate of every structured variant. Items name a variant by its position
    in ``variants`` (the job works on copies): ("measured" | "estimated", position, key, value);
    returns a note for the status line ("" when all went through)."""
    runtime, batch, threads, device = key
    original = variants[0]
    position = {id(v): i for i, v in enumerate(variants)}
    share = 0.7 / len(todo)
    done = {}
    for i, variant in enumerate(todo):
        step = sub_progress(progress, i * share, (i + 1) * share)
        done[id(variant)] = result = measure_latency(
            variant.model, runtime, batch, threads, device, max_seconds=budget,
            progress=step, cancel=cancel,
        )  # fmt: skip
        yield ("measured", position[id(variant)], key, result)
    if device != "cpu":
        return "estimates are made for the CPU only"
    side = [v for v in variants if id(v) in done or key in v.measured]
    if len(side) > 1:  # the quiet figures of all variants from interleaved passes
        results = quiet_side_by_side(
            [v.model for v in side],
            [done.get(id(v)) or v.measured[key] for v in side],
            budget,
            sub_progress(progress, 0.7, 0.85),
            cancel,
        )
        for variant, result in zip(side, results):
            done[id(variant)] = result
            yield ("measured", position[id(variant)], key, result)
    try:
        from studio.core.latency.predict import LatencyPredictor

        predictor = LatencyPredictor.build(
            original.model, runtime, batch, threads,
            progress=sub_progress(progress, 0.85, 1.0), cancel=cancel,
        )  # fmt: skip
    except StudioError as exc:
        return f"no estimate: {exc}"
    reference = done.get(id(original)) or original.measured.get(key)
    if reference is not None:  # the machine's load moves the level, not the ratios
        predictor.anchor_to(reference.quiet_ms or reference.median_ms)
    for variant in variants:
        plan = variant.plan or PruningPlan()
        if plan.method != "structured":
            continue
        yield ("estimated", position[id(variant)], key, predictor.predict(plan).total_ms)
    return ""


def profile_variant(
    variant: Variant, key: tuple, progress: ProgressFn, cancel: CancelToken
) -> Iterator[Any]:
    """The per-layer profile job: one item ("layers", 0, key, layer times) for ``variant``."""
    runtime, batch, threads, device = key
    layers = profile_layers(
        variant.model, runtime, batch, threads, device, progress=progress, cancel=cancel
    )
    yield ("layers", 0, key, layers)
