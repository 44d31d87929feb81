"""The Planner tab: choose what to cut (sliders, or Allocate to a target), see the predicted
effect live, and Apply the plan to a copy of the model in the background.

The targets come from a cost model built in the background for the session's model and the
chosen method; predictions are recomputed at most every ``SUMMARY_MS`` while sliders move.
A transformer from a Hugging Face folder is planned by head groups and MLP neurons per layer
instead (:mod:`studio.ui.panels.planner_hf_panel`, its own table and options).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from PySide6.QtCore import QTimer, Signal
from PySide6.QtWidgets import QWidget

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.target import reach_latency
from studio.core.latency.weights import layer_weights
from studio.core.models.data import matching_training_split
from studio.core.plan.allocate import CostModel, allocate
from studio.core.plan.plan import NEEDS_DATA, PruningPlan
from studio.core.prune.engine import prune
from studio.core.scan.types import ScanReport
from studio.ui import format as fmt
from studio.ui.panels.planner_hf_panel import PlannerTransformer
from studio.ui.panels.planner_latency import PlannerLatency
from studio.ui.panels.planner_layout import TARGET_KINDS, PlannerLayout
from studio.ui.panels.planner_recipes import PlannerRecipes
from studio.ui.panels.planner_scan import PlannerScan
from studio.ui.panels.planner_state import PlannerState
from studio.ui.panels.planner_summary import summary_parts
from studio.ui.runner import Job, JobRunner
from studio.ui.session import WARNING, Session

SUMMARY_MS = 80


class PlannerPanel(PlannerLayout, PlannerRecipes, PlannerScan, PlannerTransformer, QWidget):
    """Edits a :class:`PruningPlan` for the session's model and applies it."""

    error = Signal(str, str)
    ask = Signal(str, str, object)  # title, question, what to run on Yes

    def __init__(self, session: Session, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.runner = runner
        self.state = PlannerState(self)
        self.latency = PlannerLatency(session, runner, self)
        self.latency.ready.connect(self._on_latency_ready)
        self.latency.failed.connect(self._on_latency_failed)
        self.jobs: dict[str, Job] = {}
        self._apply_when_allocated = False  # the speed line's fix: re-plan, then apply
        self.last_allocation: PruningPlan | None = None  # with its target (measured, notes)
        self._pending_plan = PruningPlan()
        self._pending_recipe: tuple[PruningPlan, str] | None = None
        self._recipe_path_when_ready: str | None = None
        self._apply_when_loaded = False  # launch option: Apply once a recipe and data are in
        self._recipe_loaded = False
        self._summary_timer = QTimer(self)
        self._summary_timer.setSingleShot(True)
        self._summary_timer.setInterval(SUMMARY_MS)
        self._summary_timer.timeout.connect(self.update_summary)
        self._build()
        self.state.changed.connect(self._summary_timer.start)
        self.state.reset.connect(self.update_summary)
        self.state.undo_stack.canUndoChanged.connect(self.undo_button.setEnabled)
        self.state.undo_stack.canRedoChanged.connect(self.redo_button.setEnabled)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)
        session.model_changed.connect(self.rebuild)
        session.scan_changed.connect(self.state.set_scan)
        session.head_scan_changed.connect(self.state.set_head_scan)
        session.data_changed.connect(self._update_buttons)
        session.pruned_changed.connect(self._update_buttons)
        self.rebuild()

    # --- commands ------------------------------------------------------------------------

    def rebuild(self, *_args: object) -> None:
        """Targets for the session's model and the chosen method, built in the background."""
        model = self.session.model
        self._cancel("targets")
        self._transformer_mode(self.transformer)
        if model is None:
            self.state.start(None, PruningPlan())
            self.summary.setText("Open a model to plan its pruning.")
            return
        if self.transformer:
            self._pending_plan, work = self._transformer_targets(model)
            self.summary.setText(f"Finding the head groups and MLP neurons of {model.name}…")
            self.jobs["targets"] = self.runner.start("Planning targets", work, isolate=False)
            self.state.start(None, self._pending_plan)
            return
        method = self.method.currentText()
        plan = PruningPlan(
            method=method,
            criterion=self.criterion.currentText(),
            cap=float(self.cap.value()),
            recalibrate_bn=self.recalibrate.isChecked(),
            round_to=int(self.round_to.currentData()),
            model_fingerprint="",
        )
        self.summary.setText(f"Finding the {method} targets of {model.name}…")

        replica = model.replica()  # traced with hooks: a private copy, made on this thread

        def work(progress: ProgressFn, cancel: CancelToken) -> tuple[CostModel, str]:
            progress(0.0, f"{method} targets")
            cost = CostModel.build(replica, method)
            cancel.check()
            return cost, replica.fingerprint()

        # in the window's process: the cost model keeps Torch-Pruning's groups (autograd nodes,
        # which do not pickle), and allocation works on them
        self.jobs["targets"] = self.runner.start("Planning targets", work, isolate=False)
        self._pending_plan = plan
        self.state.start(None, plan)

    def allocate(self) -> Job | None:
        """Move the sliders so the plan meets the target (in the background)."""
        cost, model = self.state.cost, self.session.model
        if cost is None or model is None:
            return None
        if self.transformer:
            return self._allocate_transformer()
        strategy = self.strategy.currentText()
        kind = TARGET_KINDS[self.kind.currentText()]
        fraction = float(self.keep.value()) / 100.0
        report = self.session.scan if self.state.scan_matches() else None
        if strategy == "sensitivity" and report is None and self.state.plan.method != "blocks":
            return self.find_scan()  # allocates once the scan is loaded or run
        if kind == "latency" and self.latency.predictor is None:
            if self.state.plan.method != "structured":
                self._fail("Cannot allocate", "a latency target needs structured pruning")
                return None
            self.allocate_button.setEnabled(False)
            return self.latency.build(cost, then=self.allocate)  # allocates once it is ready
        plan, data = self.state.plan, self.session.data
        replica = model.replica()  # importances, the profile and the measured loop use it
        module = replica.module
        predictor = self.latency.predictor

        timed = strategy == "sensitivity" and plan.method == "structured" and plan.round_to > 1
        runtime, batch, threads = (
            (predictor.runtime, predictor.batch, predictor.threads)
            if predictor is not None
            else ("onnxruntime", 1, None)
        )

        def work(progress: ProgressFn, cancel: CancelToken) -> PruningPlan:
            weights = None
            if timed:  # drop per millisecond saved (core.latency.weights)
                progress(0.0, "profiling the layers")
                weights = layer_weights(replica, cost, runtime, batch, threads, cancel=cancel)
            progress(0.1, f"{strategy} allocation")
            args = (cost, plan, strategy, kind, fraction, report, module, data, predictor, weights)
            if kind != "latency" or predictor is None:
                return allocate(*args)
            try:  # the estimate's plan first, then measured candidates (core.latency.target)
                first = allocate(*args)
            except StudioError:
                first = None
            return reach_latency(
                replica, cost, plan, strategy, fraction, runtime, batch, threads, report, data,
                first, progress, cancel, predictor, weights,
            )  # fmt: skip

        self.jobs["allocate"] = self.runner.start("Allocating", work, isolate=False)
        self.allocate_button.setEnabled(False)
        return self.jobs["allocate"]

    def replan_runtime(self) -> Job | None:
        """Channels back to runtime, the same target allocated again, then applied."""
        self.round_to.setCurrentIndex(0)  # runtime ×N
        self._apply_when_allocated = True
        job = self.allocate()
        if job is None:
            self._apply_when_allocated = False
        return job

    def clear(self) -> None:
        self.state.set_all({}, "clear all ratios")

    def apply(self) -> Job | None:
        """Prune a copy of the model with the current plan (the loaded model never changes)."""
        model, data, plan = self.session.model, self.session.data, self.state.plan
        if model is None or self.running("apply"):
            return None
        if not plan.active():
            self._fail("Nothing to prune", "every ratio is 0: move a slider or Allocate first")
            return None
        if plan.criterion in NEEDS_DATA and data is None and not self.transformer:
            self._fail("Data needed", f"the {plan.criterion} criterion needs data: open some")
            return None
        # a transformer chooses its heads and neurons on the text's calibration split, as the
        # CLI; the quality after is measured on validation text the choice never saw
        if self.transformer:
            calibration = self.session.calibration
        else:
            calibration = matching_training_split(data) if data is not None else None

        def work(progress: ProgressFn, cancel: CancelToken) -> Any:
            return prune(model, plan, data, progress, cancel, calibration=calibration)

        self.session.log(
            f"Pruning {model.name}: {plan.method}, {plan.criterion}, {len(plan.active())} targets"
        )
        self.jobs["apply"] = self.runner.start("Pruning", work)
        self._update_buttons()
        return self.jobs["apply"]

    def revert(self) -> None:
        if self.session.pruned is not None:
            self.session.set_pruned(None)
            self.session.log("Reverted to the original model")

    def running(self, key: str) -> bool:
        job = self.jobs.get(key)
        return job is not None and not job.done

    def _cancel(self, key: str) -> None:
        if self.running(key):
            self.jobs[key].cancel()

    # --- results -------------------------------------------------------------------------

    def _on_finished(self, job: Job, result: object) -> None:
        key = next((k for k, j in self.jobs.items() if j is job), None)
        if key == "targets":
            cost, fingerprint = result  # type: ignore[misc]
            self.state.start(cost, replace(self._pending_plan, model_fingerprint=fingerprint))
            self.state.set_scan(self.session.scan)
            self.state.set_head_scan(self.session.head_scan)
            recipe, self._pending_recipe = self._pending_recipe, None
            if recipe is not None:
                self._apply_recipe(recipe)
            path, self._recipe_path_when_ready = self._recipe_path_when_ready, None
            if path is not None:
                self._load_reporting(path)
        elif key == "allocate":
            assert isinstance(result, PruningPlan)
            target = result.target
            self.last_allocation = result
            self.state.set_all(result.ratios, f"allocate {target.get('allocate', '')}")
            if self.transformer:
                self._log_transformer_allocation(result)
                self._update_buttons()
                return
            measured = (
                f", measured at {target['measured']:.1%} of the original's latency "
                f"({target.get('candidates')} candidates timed)"
                if "measured" in target
                else ""
            )
            self.session.log(
                f"Allocated by {target.get('allocate')}: keep {target.get('fraction', 0):.0%} "
                f"of the {target.get('kind')}{measured}"
            )
            if target.get("note"):
                self.session.log(str(target["note"]), WARNING)
            if self._apply_when_allocated:
                self._apply_when_allocated = False
                QTimer.singleShot(0, self, self.apply)
        elif key == "find_scan":
            report, missing = result  # type: ignore[misc]
            self._scan_found(report, missing)
        elif key == "scan":
            assert isinstance(result, ScanReport)
            self.session.set_scan(result)
            self.allocate()
        elif key == "apply":
            self.session.set_pruned(result)
            if self.transformer:
                self._show_transformer_result(result)
            else:
                self._log_result(result)
        else:
            self._transformer_finished(key, result)
        self._update_buttons()

    def _log_result(self, result: Any) -> None:
        s = self.session
        s.log(
            f"Pruned: parameters {result.params_before:,} → {result.params_after:,}, "
            f"MACs {result.macs_before:,} → {result.macs_after:,} in "
            f"{fmt.duration(result.seconds)}"
        )
        for note in getattr(result, "notes", ()):
            s.log(note)
        for layer, reason in getattr(result, "skipped", ()):
            s.log(f"Rolled back {layer}: {reason}", WARNING)

    def _on_failed(self, job: Job, message: str) -> None:
        key = next((k for k, j in self.jobs.items() if j is job), None)
        if key is not None:
            title = {
                "targets": "Cannot plan",
                "allocate": "Allocation failed",
                "find_scan": "Cannot scan",
                "scan": "Scan failed",
                "hf_find_scan": "Cannot scan",
                "hf_scan": "Scan failed",
            }.get(key, "Pruning failed")
            self._fail(title, message, job.traceback)
            self._update_buttons()

    def _on_cancelled(self, job: Job) -> None:
        if job in self.jobs.values():
            self._update_buttons()

    def _fail(self, title: str, message: str, trace: str = "") -> None:
        self.session.log_failure(title, message, trace)
        self.error.emit(title, message)

    # --- view ----------------------------------------------------------------------------

    def update_summary(self) -> None:
        """The strip: parameters and MACs before -> after, and the predicted drop."""
        if self.transformer:
            self._transformer_summary()
            return
        cost, prediction = self.state.cost, self.state.predict()
        if cost is None or prediction is None:
            return
        parts = summary_parts(cost, prediction, self.state.report, self.state.plan.method)
        latency = self.latency.text(self.state.plan)
        if latency:
            parts.append(latency)
        self.summary.setText("  ·  ".join(parts))

    def _on_latency_ready(self) -> None:
        self.update_summary()
        self._update_buttons()

    def _on_latency_failed(self, message: str) -> None:
        if message:
            self._fail("Cannot estimate latency", message)
        self._update_buttons()

    def _update_buttons(self, *_args: object) -> None:
        has_targets = self.state.cost is not None
        busy = self.running("apply")
        allocating = any(
            self.running(k) for k in ("allocate", "find_scan", "scan", "hf_find_scan", "hf_scan")
        )
        self.allocate_button.setEnabled(has_targets and not allocating)
        self.apply_button.setEnabled(has_targets and not busy and bool(self.state.plan.active()))
        self.apply_button.setText("Pruning…" if busy else "Apply")
        self.revert_button.setEnabled(self.session.pruned is not None)
        self.save_button.setEnabled(has_targets)
        self.load_button.setEnabled(has_targets)
        self.clear_button.setEnabled(bool(self.state.plan.active()))
        self.latency_button.setEnabled(
            has_targets and self.latency.predictor is None and not self.latency.building
        )
        if self.session.pruned is None:
            self.result_line.clear()
            self.result_line.hide()
