"""Gradual pruning during training: the steps of a :class:`GradualSchedule` applied to the
model being trained, each by the pruning engine (:func:`studio.core.prune.engine.prune`), so
channels are ranked, removed, rolled back and batch norms recalibrated exactly as
``studio prune`` does.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from studio.core.jobs import CancelToken, check
from studio.core.models.data import DataSet
from studio.core.models.loaded import LoadedModel
from studio.core.plan.plan import NEEDS_DATA
from studio.core.prune import structured as prune_structured
from studio.core.prune.weights import weight_targets
from studio.core.train.schedule import GradualSchedule, channel_units

CRITERION_SAMPLES = 256  # data for criteria that rank on data (taylor, apoz, activation)


class GradualPruner:
    """Applies the schedule's pruning steps as training reaches them; ``done`` steps so far.
    Refuses, on creation, a plan made for another model or naming targets it lacks."""

    def __init__(self, schedule: GradualSchedule, student: LoadedModel, train: DataSet) -> None:
        self.schedule = schedule
        self.student = student
        self.train = train
        self.done = 0
        plan = schedule.plan
        if plan.method == "structured":
            self._original = self._units(student.module)
            names = set(self._original)
        else:
            self._original = {}
            names = set(weight_targets(student.module, plan.method))
        plan.check_model(student.fingerprint(), names)

    @property
    def scale(self) -> float:
        """Fraction of the final plan applied so far."""
        return self.schedule.scale(self.done)

    @property
    def finished(self) -> bool:
        return self.done >= self.schedule.steps

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the next pruning step comes before training step ``step``."""
        return not self.finished and step >= self.schedule.step_at(self.done + 1, total_steps)

    def apply(
        self,
        module: nn.Module,
        step: int,
        total_steps: int,
        device: torch.device,
        cancel: CancelToken | None = None,
    ) -> nn.Module:
        """Every pruning step due at ``step``; returns the pruned model (a new module)."""
        while self.due(step, total_steps):
            check(cancel)
            module = self._prune(module.cpu().eval(), self.done + 1, cancel)
            self.done += 1
        return module.to(device)

    def _prune(self, module: nn.Module, k: int, cancel: CancelToken | None) -> nn.Module:
        from studio.core.prune.engine import prune

        plan = self.schedule.plan
        current = self._units(module) if plan.method == "structured" else {}
        step_plan = self.schedule.step_plan(k, self._original, current)
        if not step_plan.active():
            return module
        loaded = replace(self.student, module=module, notes=[])
        data = self.train.subset(CRITERION_SAMPLES) if plan.criterion in NEEDS_DATA else None
        return prune(loaded, step_plan, data, cancel=cancel, calibration=self.train).module

    def _units(self, module: nn.Module) -> dict[str, int]:
        """Channels of every structured group (per head dimension for fused q/k/v)."""
        copied = copy.deepcopy(module).cpu().eval()
        _, groups = prune_structured.trace(copied, self.student.example_input())
        return {info.root: channel_units(copied, info.root, info.channels) for info, _ in groups}
