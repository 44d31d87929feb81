"""The Planner's recipes: load a plan from YAML/JSON into the sliders (rebuilding the targets
when its method differs), save the current plan, and the launch options that load and apply
one. A mix-in of :class:`studio.ui.panels.planner_panel.PlannerPanel`, which provides the widgets,
the state and ``apply``/``rebuild``/``_fail``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QFileDialog

from studio.core.errors import StudioError
from studio.core.plan.plan import PruningPlan
from studio.ui.panels.planner_hf_panel import check_transformer_plan

RECIPE_FILTER = "Recipes (*.yaml *.yml *.json)"


class PlannerRecipes:
    """Recipe loading and saving for the Planner tab."""

    state: Any
    session: Any
    method: Any
    transformer: bool

    def save_recipe(self, path: str | Path) -> Path:
        return self.state.plan.save(path, self.session.input_files())

    def load_recipe(self, path: str | Path) -> None:
        """Read a recipe: its method first (targets are rebuilt if it differs), then its
        criterion, cap, locks and ratios."""
        plan = PruningPlan.load(path)
        model = self.session.model
        if model is None:
            raise StudioError("open a model before loading a recipe")
        plan.check_model(model.fingerprint())
        if self.transformer:
            check_transformer_plan(plan)
        if plan.method != self.state.plan.method or self.state.cost is None:
            self._pending_recipe = (plan, Path(path).name)
            self.method.setCurrentText(plan.method)  # rebuilds; the ratios follow
            if self.method.currentText() == self.state.plan.method and not self.running("targets"):
                self.rebuild()
            return
        self._apply_recipe((plan, Path(path).name))

    def load_recipe_when_ready(self, path: str, apply: bool = False) -> None:
        """Load a recipe as soon as the model's targets are known (used at launch), and with
        ``apply`` Apply it once the data is in too."""
        self._apply_when_loaded = apply
        if apply:
            self.session.data_changed.connect(self._apply_if_pending)
        if self.state.cost is not None and not self.running("targets"):
            self._load_reporting(path)
        else:
            self._recipe_path_when_ready = path

    def _load_reporting(self, path: str) -> None:
        try:
            self.load_recipe(path)
        except StudioError as exc:
            self._fail("Could not load the recipe", str(exc))

    def _apply_recipe(self, recipe: tuple[PruningPlan, str]) -> None:
        plan, name = recipe
        try:
            plan.check_model("", {t.name for t in self.state.targets})
        except StudioError as exc:
            self._fail("Could not load the recipe", str(exc))
            return
        if self.transformer:  # the CNN options stay as they are, for the next CNN
            fields = ("criterion", "cap", "recalibrate_bn", "round_to", "ignored")
            self.state.set_plan_fields(**{f: getattr(plan, f) for f in fields})
        else:
            self._recipe_options(plan)
        for target in self.state.targets:
            self.state.set_locked(target.name, target.name in plan.locked)
        self.state.set_all(plan.ratios, f"load recipe {name}")
        self.session.log(f"Loaded recipe {name}: {len(plan.active())} targets to prune")
        self._recipe_loaded = True
        self._apply_if_pending()

    def _recipe_options(self, plan: PruningPlan) -> None:
        self.criterion.setCurrentText(plan.criterion)
        self.cap.setValue(plan.cap)
        self.recalibrate.setChecked(plan.recalibrate_bn)
        index = self.round_to.findData(plan.round_to)
        if index < 0:
            self.round_to.addItem(f"×{plan.round_to}", plan.round_to)
            index = self.round_to.count() - 1
        self.round_to.setCurrentIndex(index)
        self.state.set_plan_fields(ignored=plan.ignored)

    def _apply_if_pending(self, *_args: object) -> None:
        if self._apply_when_loaded and self._recipe_loaded and self.session.data is not None:
            self._apply_when_loaded = False
            QTimer.singleShot(0, self.apply)

    def _ask_save_recipe(self) -> None:
        name = (self.session.model.name if self.session.model else "model").split()[0]
        path, _ = QFileDialog.getSaveFileName(
            self, "Save recipe", f"{name}-recipe.yaml", RECIPE_FILTER
        )
        if path:
            try:
                self.session.log(f"Saved recipe {self.save_recipe(path)}")
            except StudioError as exc:
                self._fail("Could not save the recipe", str(exc))

    def _ask_load_recipe(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load recipe", "", RECIPE_FILTER)
        if path:
            self._load_reporting(path)
