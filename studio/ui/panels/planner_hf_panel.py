"""The Planner for a transformer from a Hugging Face folder: targets are each layer's head
groups and MLP neurons (:mod:`studio.ui.panels.planner_hf`), the target is a fraction of the
parameters or of the MACs of one sequence, allocated uniformly or by the transformer scan
(:func:`studio.core.plan.transformer.allocate_transformer`), and the scan is the cached one of
this model and calibration text, or one run as a job after asking. A mix-in of
:class:`studio.ui.panels.planner_panel.PlannerPanel`, which provides the widgets, the jobs and
``_fail``; CNN models never reach this code."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.lm_target import reach_lm_latency
from studio.core.models.loaded import LoadedModel
from studio.core.plan.plan import PruningPlan
from studio.core.plan.transformer import allocate_transformer
from studio.core.scan.heads import MLP_RATIOS, SCAN_SEQUENCES, HeadScan, scan_heads
from studio.ui.panels import planner_hf
from studio.ui.panels.planner_hf import TransformerCost, base_plan, text_splits

HF_STRATEGIES = ("sensitivity", "uniform")
LATENCY_CNN, LATENCY_HF = "latency (estimated)", "latency (measured)"  # the kind's item text
HF_KINDS = {"parameters": "params", "MACs": "macs", LATENCY_HF: "latency"}
LATENCY_THREADS = 1  # as studio prune --target-latency and the language_models benchmark
HF_KEEP = 80.0  # % of the parameters: embeddings and norms stay, so 50 % is rarely reachable


class PlannerTransformer:
    """Transformer mode of the Planner tab."""

    state: Any
    session: Any
    runner: Any
    jobs: dict
    ask: Any
    summary: Any
    table: Any
    hf_table: Any
    tables: Any  # a stack of the two
    method: Any
    kind: Any
    strategy: Any
    keep: Any
    allocate_button: Any
    result_line: Any
    _cnn_only: list  # widgets that mean nothing for a transformer (criterion, cap, BN, ...)
    _was_transformer = False
    _cnn_target = ("MACs", 50.0)

    @property
    def transformer(self) -> bool:
        """Whether the Planner shows a transformer's heads and MLP neurons."""
        return planner_hf.is_transformer(self.session.model)

    def _transformer_mode(self, on: bool) -> None:
        """Show the transformer's table and options, or the CNN ones (as they were)."""
        for widget in self._cnn_only:
            widget.setVisible(not on)
        self.tables.setCurrentWidget(self.hf_table if on else self.table)
        self.method.setEnabled(not on)
        latency = self.kind.findText(LATENCY_HF if not on else LATENCY_CNN)
        if latency >= 0:  # a transformer's latency target is timed, not estimated
            self.kind.setItemText(latency, LATENCY_HF if on else LATENCY_CNN)
        for combo, allowed in ((self.strategy, HF_STRATEGIES), (self.kind, HF_KINDS)):
            for i in range(combo.count()):
                combo.model().item(i).setEnabled(not on or combo.itemText(i) in allowed)
        if on:
            self.method.blockSignals(True)
            self.method.setCurrentText("structured")
            self.method.blockSignals(False)
            if self.strategy.currentText() not in HF_STRATEGIES:
                self.strategy.setCurrentText(HF_STRATEGIES[0])
            if not self._was_transformer:  # the CNN's target comes back with the next CNN
                self._cnn_target = (self.kind.currentText(), self.keep.value())
                self.kind.setCurrentText("parameters")
                self.keep.setValue(HF_KEEP)
            self.keep.setToolTip(
                "Percent of the model's parameters (or MACs of one sequence) to keep; for\n"
                "latency, percent of the original's time (decode per token for a decoder,\n"
                "prefill for an encoder), measured on 1 thread"
            )
        elif self._was_transformer:
            self.kind.setCurrentText(self._cnn_target[0])
            self.keep.setValue(self._cnn_target[1])
            self.keep.setToolTip("")
        self.result_line.setVisible(on and bool(self.result_line.text()))
        self._was_transformer = on

    def _transformer_targets(self, model: LoadedModel) -> tuple[PruningPlan, Any]:
        """The plan to start from and the job's work (the cost, with MACs traced on a replica,
        and the fingerprint, which hashes every weight: not on the GUI thread)."""
        plan = replace(base_plan(model, self.session.data is not None), model_fingerprint="")
        replica = model.replica()  # traced with hooks: a private copy, made on this thread

        def work(progress: ProgressFn, cancel: CancelToken) -> tuple[TransformerCost, str]:
            progress(0.0, "head groups and MLP neurons")
            cost = TransformerCost.build(replica)
            cancel.check()
            return cost, replica.fingerprint()

        return plan, work

    def _allocate_transformer(self) -> Any:
        """Head groups and MLP neurons for the parameter, MAC or measured latency target,
        uniform or by the scan."""
        strategy = self.strategy.currentText()
        kind = HF_KINDS.get(self.kind.currentText(), "params")
        fraction = float(self.keep.value()) / 100.0
        scan = self.state.head_scan()
        if strategy == "sensitivity" and scan is None:
            return self._find_transformer_scan()
        plan = self.state.plan  # locked layers keep their ratios
        base = replace(plan, ratios={n: plan.ratio(n) for n in plan.locked}, target={})
        replica = self.session.model.replica()  # a MAC target traces it with hooks

        def work(progress: ProgressFn, cancel: CancelToken) -> PruningPlan:
            progress(0.0, f"{strategy} allocation of head groups and MLP neurons")
            if kind == "latency":  # candidates pruned and timed against the original
                plan, _ = reach_lm_latency(
                    replica, str(fraction), strategy, scan, base, threads=LATENCY_THREADS,
                    progress=progress, cancel=cancel,
                )  # fmt: skip
                return plan
            return allocate_transformer(replica, fraction, strategy, scan, base=base, kind=kind)

        self.jobs["allocate"] = self.runner.start("Allocating", work, isolate=False)
        self.allocate_button.setEnabled(False)
        return self.jobs["allocate"]

    def _find_transformer_scan(self) -> Any:
        """The cached transformer scan of this model and calibration text (loaded at once), or
        a question whether to run it."""
        model = self.session.model
        calibration, _ = text_splits(self.session)
        if calibration is None:
            self._fail(
                "Cannot allocate by sensitivity",
                "the transformer scan measures the model on text: open text data "
                "(Data menu), or allocate uniformly",
            )
            return None

        def work(progress: ProgressFn, cancel: CancelToken) -> bool:
            progress(0.0, "looking for a cached transformer scan")
            return planner_hf.head_scan_cached(model, calibration)

        self.allocate_button.setEnabled(False)
        # in a job process, as the scan: the cache it looks in is the one the scan writes to
        self.jobs["hf_find_scan"] = self.runner.start("Looking for a cached scan", work)
        return self.jobs["hf_find_scan"]

    def _transformer_scan_found(self, cached: bool) -> None:
        if cached:
            self._scan_transformer()
            return
        cost = self.state.cost
        assert isinstance(cost, TransformerCost)
        calibration, _ = text_splits(self.session)
        groups = sum(r.units.groups for r in cost.rows)
        layers = len(cost.rows)
        sequences = min(len(calibration), SCAN_SEQUENCES) if calibration is not None else 0
        self.ask.emit(
            "Run a transformer scan?",
            f"Allocating by sensitivity needs a transformer scan of this model: each of its "
            f"{groups} head groups, {len(MLP_RATIOS)} MLP ratios in each of its {layers} layers "
            f"and each whole layer switched off in turn, measured on {sequences} calibration "
            "sequences. There is none in the cache.\n\n"
            "Run the scan now? Allocation follows when it finishes (Cancel stops it).",
            self._scan_transformer,
        )

    def _scan_transformer(self) -> Any:
        model = self.session.model
        calibration, _ = text_splits(self.session)
        if model is None or calibration is None:
            return None

        def work(progress: ProgressFn, cancel: CancelToken) -> HeadScan:
            return scan_heads(model, calibration, progress=progress, cancel=cancel)

        self.session.log(f"Scanning the heads and MLP neurons of {model.name} to allocate")
        self.allocate_button.setEnabled(False)
        self.jobs["hf_scan"] = self.runner.start("Scanning heads for allocation", work)
        return self.jobs["hf_scan"]

    def _transformer_finished(self, key: str | None, result: object) -> bool:
        """Handle a finished transformer job; False when ``key`` is not one."""
        if key == "hf_find_scan":
            self._transformer_scan_found(bool(result))
        elif key == "hf_scan":
            assert isinstance(result, HeadScan)
            how = "loaded from the cache" if result.cached else f"in {result.seconds:.1f} s"
            self.session.log(f"Transformer scan {how}: {len(result.layers)} layers")
            self.session.set_head_scan(result)
            self.state.set_head_scan(result)
            self.allocate()
        else:
            return False
        return True

    def _log_transformer_allocation(self, plan: PruningPlan) -> None:
        target, cost = plan.target, self.state.cost
        if cost is None:
            return
        params, macs = cost.predict(plan.ratios)
        kept = (
            f"the plan keeps {params / max(cost.params_before, 1):.1%} of the parameters and "
            f"{macs / max(cost.macs_before, 1):.1%} of the MACs"
        )
        if "latency" in target:
            self.session.log(
                f"Allocated head groups and MLP neurons by {target.get('allocate')} for "
                f"{float(target['latency']):.0%} of the original's {target.get('metric')}: "
                f"measured {float(target['measured']):.1%} ({target.get('threads')} thread); "
                + kept
            )
            return
        kind = "macs" if "macs" in target else "params"
        what = "MACs" if kind == "macs" else "parameters"
        self.session.log(
            f"Allocated head groups and MLP neurons by {target.get('allocate')}: keep at most "
            f"{float(target.get(kind, 0)):.0%} of the {what}; " + kept
        )

    def _transformer_summary(self) -> None:
        cost = self.state.cost
        if not isinstance(cost, TransformerCost):
            return
        parts = planner_hf.summary_parts(cost, self.state.plan, self.state.head_scan())
        self.summary.setText("  ·  ".join(parts))

    def _show_transformer_result(self, result: Any) -> None:
        text = planner_hf.result_text(result)
        self.session.log(text)
        for note in getattr(result, "notes", ()):
            self.session.log(note)
        self.result_line.setText(text)
        self.result_line.setVisible(True)


def check_transformer_plan(plan: PruningPlan) -> None:
    """A recipe for a transformer is structured (head groups and MLP neurons)."""
    if plan.method != "structured":
        raise StudioError(
            f"the Planner plans transformers by head groups and MLP neurons (structured), not "
            f"{plan.method}: apply a {plan.method} recipe with studio prune --recipe"
        )
