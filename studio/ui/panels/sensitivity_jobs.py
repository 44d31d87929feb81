"""What the Sensitivity tab runs in the background (in the job's process, or here on Ray): the
scan as a stream of items for the heatmap, and a transformer's head/MLP/layer scan."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from studio.core.cluster.connection import Compute
from studio.core.jobs import CancelToken, ProgressFn, sub_progress
from studio.core.models.data import DataSet
from studio.core.models.loaded import LoadedModel
from studio.core.scan.heads import HeadScan, scan_heads
from studio.core.scan.sensitivity import SensitivityScan
from studio.core.scan.types import ScanReport, ScanSettings


def scan_stream(
    model: LoadedModel,
    data: DataSet,
    settings: ScanSettings,
    use_cache: bool,
    compute: Compute,
    progress: ProgressFn,
    cancel: CancelToken,
) -> Iterator[Any]:
    """The scan's items: where it runs (a ClusterInfo, on Ray), the prepared report (targets,
    baseline and cached rows), then one row at a time; returns the scan's seconds."""
    if compute.on_ray and settings.method != "taylor":  # taylor: one pass, here
        from studio.core.cluster import scan as _ray_scan  # noqa: F401 - registers it
        from studio.core.cluster.connection import check_connection

        progress(0.0, f"connecting to Ray ({compute.address})")
        yield check_connection(compute.address)  # ClusterInfo: where it runs
        scan = SensitivityScan(
            model,
            data,
            settings,
            use_cache=use_cache,
            workers=compute.workers,
            ray_address=compute.address,
        )
    else:
        scan = SensitivityScan(model, data, settings, use_cache=use_cache)
    prepared = scan.prepare(sub_progress(progress, 0.0, 0.05), cancel)
    yield ScanReport(
        settings,
        list(prepared.targets),
        prepared.baseline,
        list(prepared.rows),
        cached_rows=prepared.cached_rows,
    )
    rest = sub_progress(progress, 0.05, 1.0)
    yield from scan.run(rest, cancel)
    assert scan.report is not None
    return scan.report.seconds


def head_scan_job(
    model: LoadedModel, data: DataSet, use_cache: bool
) -> Callable[[ProgressFn, CancelToken, Callable[[Any], None]], HeadScan]:
    """The transformer scan for ``JobRunner.start_callbacks``: after each layer, a copy of
    the scan so far (its drops; the rest NaN) is emitted for the heatmap."""

    def run(progress: ProgressFn, cancel: CancelToken, emit: Callable[[Any], None]) -> HeadScan:
        def on_row(scan: HeadScan, _layer: int) -> None:
            emit(snapshot(scan))

        return scan_heads(
            model, data, use_cache=use_cache, progress=progress, cancel=cancel, on_row=on_row
        )

    return run


def snapshot(scan: HeadScan) -> HeadScan:
    """A copy of a scan in progress that the scan's later rows do not change (small: without
    the neuron order)."""
    return replace(
        scan,
        head_drop=scan.head_drop.copy(),
        mlp_drop=scan.mlp_drop.copy(),
        layer_drop=scan.layer_drop.copy(),
        neuron_order=[],
    )
