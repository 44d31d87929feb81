"""The plan being edited in the Planner tab: ratios with undo/redo, its cost model, and what it
is predicted to do.

Edits go through ``QUndoStack`` commands; a slider drag previews without a command and
commits one command on release, so undo steps are whole gestures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoCommand, QUndoStack

from studio.core.plan.allocate import CostModel, PlanTarget, predicted_drop
from studio.core.plan.plan import PruningPlan
from studio.core.scan.heads import HeadScan
from studio.core.scan.types import ScanReport
from studio.ui.panels.planner_hf import TransformerCost

SCAN_MODE = {"structured": "structured", "unstructured": "unstructured", "nm": "nm"}


@dataclass(frozen=True)
class Prediction:
    """What the plan is predicted to give, without pruning."""

    params: int
    macs: int
    drop: float | None  # summed per-target drop from the scan, None without a matching scan
    # (transformers: the transformer scan's predicted loss increase)
    target_drops: dict[str, float]
    removed_params: dict[str, int]  # parameters each target's ratio alone removes
    removed_macs: dict[str, int]


class _RatiosCommand(QUndoCommand):
    def __init__(self, state: PlannerState, before: dict, after: dict, text: str) -> None:
        super().__init__(text)
        self.state, self.before, self.after = state, before, after

    def redo(self) -> None:
        self.state._set_ratios(self.after)

    def undo(self) -> None:
        self.state._set_ratios(self.before)


class _LockCommand(QUndoCommand):
    def __init__(self, state: PlannerState, name: str, locked: bool) -> None:
        super().__init__(f"{'lock' if locked else 'unlock'} {name}")
        self.state, self.name, self.locked = state, name, locked

    def redo(self) -> None:
        self.state._set_lock(self.name, self.locked)

    def undo(self) -> None:
        self.state._set_lock(self.name, not self.locked)


class PlannerState(QObject):
    """One plan for one model; views call the edit methods and listen to ``changed``."""

    changed = Signal()  # ratios, locks or the scan changed (recompute predictions)
    reset = Signal()  # new targets: views rebuild their rows

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.cost: CostModel | TransformerCost | None = None
        self.plan = PruningPlan()
        self.report: ScanReport | None = None
        self.transformer_scan: HeadScan | None = None
        self.undo_stack = QUndoStack(self)

    @property
    def targets(self) -> list[PlanTarget]:
        return self.cost.targets if self.cost is not None else []

    def start(self, cost: CostModel | TransformerCost | None, plan: PruningPlan) -> None:
        """New targets (another model or method): the plan starts over, undo history too."""
        self.cost = cost
        self.plan = plan
        self.undo_stack.clear()
        self.reset.emit()
        self.changed.emit()

    def set_scan(self, report: ScanReport | None) -> None:
        """Use this scan's curves for predicted drops if it measured the plan's kind of pruning."""
        self.report = report
        self.changed.emit()

    def set_head_scan(self, scan: HeadScan | None) -> None:
        """A transformer's head/MLP scan, for the predicted drops of a transformer's plan."""
        self.transformer_scan = scan
        self.changed.emit()

    def scan_matches(self) -> bool:
        r = self.report
        return isinstance(r, ScanReport) and r.settings.mode == SCAN_MODE.get(self.plan.method)

    def head_scan(self) -> HeadScan | None:
        """The transformer scan on show, if it was made for a model shaped like this one."""
        cost, r = self.cost, self.transformer_scan
        if isinstance(cost, TransformerCost) and r is not None and cost.fits(r):
            return r
        return None

    # --- edits ---------------------------------------------------------------------------

    def preview_ratio(self, name: str, ratio: float) -> None:
        """Show a ratio while a slider is dragged (no undo step yet)."""
        self._set_ratios({**self.plan.ratios, name: ratio})

    def commit_ratio(self, name: str, before: float, after: float) -> None:
        """One undoable edit of one ratio (after a drag ends, or a typed value)."""
        old = {**self.plan.ratios, name: before}
        new = {**self.plan.ratios, name: after}
        if abs(before - after) < 1e-12:
            self._set_ratios(new)
            return
        self.undo_stack.push(_RatiosCommand(self, old, new, f"{name}: {before:g} → {after:g}"))

    def set_all(self, ratios: Mapping[str, float], text: str) -> None:
        """Replace every ratio in one undoable step (allocation, uniform, clear)."""
        new = {t.name: float(ratios.get(t.name, 0.0)) for t in self.targets}
        self.undo_stack.push(_RatiosCommand(self, dict(self.plan.ratios), new, text))

    def set_locked(self, name: str, locked: bool) -> None:
        if (name in self.plan.locked) != locked:
            self.undo_stack.push(_LockCommand(self, name, locked))

    def set_plan_fields(self, **fields: object) -> None:
        """Change method-independent fields (criterion, cap) without touching ratios."""
        plan = replace(self.plan, **fields)  # type: ignore[arg-type]
        self.plan = plan.with_ratios({n: min(r, plan.cap) for n, r in plan.ratios.items()})
        self.changed.emit()

    def _set_ratios(self, ratios: Mapping[str, float]) -> None:
        self.plan = replace(self.plan, ratios={}).with_ratios(ratios)
        self.changed.emit()

    def _set_lock(self, name: str, locked: bool) -> None:
        locks = [n for n in self.plan.locked if n != name] + ([name] if locked else [])
        self.plan = replace(self.plan, locked=tuple(locks))
        self.changed.emit()

    # --- predictions ---------------------------------------------------------------------

    def predict(self) -> Prediction | None:
        """Totals and per-target effects of the current ratios (fast: sliders call this)."""
        if self.cost is None:
            return None
        ratios = self.plan.active()
        params, macs = self.cost.predict(ratios)
        removed_params, removed_macs = {}, {}
        for name, ratio in ratios.items():
            p, m = self.cost.predict({name: ratio})
            removed_params[name] = self.cost.params_before - p
            removed_macs[name] = self.cost.macs_before - m
        drop, drops = None, {}
        head_scan = self.head_scan()
        if head_scan is not None:
            assert isinstance(self.cost, TransformerCost)
            drop, drops = self.cost.predicted_drops(head_scan, ratios)
        elif self.scan_matches():
            assert self.report is not None
            drop, drops = predicted_drop(ratios, self.report)
        return Prediction(params, macs, drop, drops, removed_params, removed_macs)
