"""What the Sensitivity tab runs in the background (in the job's process, or here on Ray): the
scan as a stream of items for the heatmap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from studio.core.cluster.connection import Compute
from studio.core.jobs import CancelToken, ProgressFn, sub_progress
from studio.core.models.data import DataSet
from studio.core.models.loaded import LoadedModel
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
