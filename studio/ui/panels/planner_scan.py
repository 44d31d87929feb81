"""The Planner's way to a sensitivity scan: allocating by sensitivity with no scan on show loads
the cached scan of this model and data (the Sensitivity tab's default settings), or asks to run
it, and allocates once it is there. A mix-in of
:class:`studio.ui.panels.planner_panel.PlannerPanel`, which provides the widgets, the jobs and
``allocate``/``_fail``; its ``ask`` signal carries the question to the window."""

from __future__ import annotations

from typing import Any

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.scan.sensitivity import SensitivityScan
from studio.core.scan.sensitivity import scan as scan_model
from studio.core.scan.types import ScanReport, ScanSettings


class PlannerScan:
    """Finds, or runs, the scan that sensitivity allocation needs."""

    state: Any
    session: Any
    runner: Any
    jobs: dict
    allocate_button: Any
    ask: Any

    def find_scan(self) -> Any:
        """Sensitivity allocation without a scan on show: load the cached scan of this model
        and data, or offer to run it (then allocate)."""
        model, data, mode = self.session.model, self.session.data, self.state.plan.method
        if model is None:
            return None
        if data is None:
            self._fail(
                "Cannot allocate by sensitivity",
                f"a {mode} sensitivity scan measures the model on data: open data, or choose "
                "global or uniform",
            )
            return None
        settings = ScanSettings.for_allocation(mode, data.labelled)
        replica = model.replica()

        def work(progress: ProgressFn, cancel: CancelToken) -> tuple[ScanReport, int]:
            scan = SensitivityScan(replica, data, settings)
            prepared = scan.prepare(progress, cancel)
            return prepared, len(prepared.targets) * len(settings.ratios) - len(prepared.rows)

        self.allocate_button.setEnabled(False)
        self.jobs["find_scan"] = self.runner.start("Looking for a cached scan", work)
        return self.jobs["find_scan"]

    def _scan_for_allocation(self) -> Any:
        model, data, mode = self.session.model, self.session.data, self.state.plan.method
        if model is None or data is None:
            return None
        settings = ScanSettings.for_allocation(mode, data.labelled)
        replica = model.replica()

        def work(progress: ProgressFn, cancel: CancelToken) -> ScanReport:
            return scan_model(replica, data, settings, progress, cancel)

        self.session.log(f"Scanning {model.name} ({mode}) to allocate by sensitivity")
        self.allocate_button.setEnabled(False)
        self.jobs["scan"] = self.runner.start("Scanning for allocation", work)
        return self.jobs["scan"]

    def _scan_found(self, report: ScanReport, missing: int) -> None:
        if missing == 0:
            self.session.log(f"Loaded the cached {report.settings.mode} scan of this model")
            self.session.set_scan(report)
            self.allocate()
            return
        total = len(report.targets) * len(report.settings.ratios)
        self.ask.emit(
            "Run a sensitivity scan?",
            f"Allocating by sensitivity needs a {report.settings.mode} sensitivity scan of this "
            f"model on this data. {missing} of its {total} measurements are not cached.\n\n"
            "Run the scan now? Allocation follows when it finishes (Cancel stops it).",
            self._scan_for_allocation,
        )
