"""Schedules of the training engine: the learning rate per step, image augmentation, and the
gradual-pruning schedule (Zhu & Gupta's cubic schedule, Distiller's AGP).

The learning rate is a pure function of the global step, so a run continued from a checkpoint
(or after the optimizer is rebuilt by a gradual pruning step) follows the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from studio.core.errors import StudioError
from studio.core.models.graph import head_layout
from studio.core.plan.plan import PruningPlan
from studio.core.scan.masks import channels_to_prune
from studio.core.train.types import FinetuneSettings

GRADUAL_METHODS = ("structured", "unstructured", "nm")
RAMP = 0.5  # gradual pruning steps are spread over this fraction of training


def lr_factor(settings: FinetuneSettings, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at global ``step`` (0-based): linear warm-up,
    then cosine to zero, step decay, or constant."""
    total = max(1, settings.epochs * steps_per_epoch)
    warmup = settings.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if settings.schedule == "cosine":
        span = max(1.0, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    if settings.schedule == "step":
        return settings.gamma ** (step // (settings.step_size * steps_per_epoch))
    return 1.0


def augment(
    x: torch.Tensor,
    settings: FinetuneSettings,
    generator: torch.Generator,
    background: float,
) -> torch.Tensor:
    """Random shifts (pad with ``background`` by ``shift_pixels``, crop back) and optional
    horizontal flips of a batch of images (N, C, H, W); other inputs are returned as they are."""
    if x.dim() != 4 or min(x.shape[-2:]) < 8:
        return x
    b, _, h, w = x.shape
    shift = settings.shift_pixels
    if settings.augment == "shift" and shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift), value=background)
        dy = torch.randint(0, 2 * shift + 1, (b, 1), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * shift + 1, (b, 1), generator=generator).to(x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        # indexed on every axis, the result has the standard NCHW strides; indexing rows and
        # columns alone and permuting gave one-channel batches channels-last strides, which
        # trained the model in oneDNN's NHWC kernels (studio.core.models.memory_format)
        x = padded[batch, channels, rows, cols]
    if settings.flips:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


@dataclass(frozen=True)
class GradualSchedule:
    """Raise a plan's ratios from ``start_fraction`` of their final values to all of them in
    ``steps`` pruning steps: at step k of N the ratios are the final ones times
    ``s_k = f + (1 - f) * (1 - (1 - k/N)^3)`` (fast at first, slowly at the end, when the
    network has least to give). The steps are spread evenly over the first half of training
    (step 1 at the start), so the second half fine-tunes the final model.

    Structured plans remove channels physically at every step: the ratio given to the engine
    is the share of the *remaining* channels that brings the total removed to
    ``channels_to_prune(original, final * s_k)``, so the last step ends with exactly the
    channels one-shot pruning keeps. Unstructured and N:M plans zero weights; the zeros stay
    zero through training (masks), and each step zeroes more.
    """

    plan: PruningPlan
    steps: int
    start_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.plan.method not in GRADUAL_METHODS:
            raise StudioError(
                f"gradual pruning works with {', '.join(GRADUAL_METHODS)} plans, "
                f"not {self.plan.method}"
            )
        if not isinstance(self.steps, int) or self.steps < 1:
            raise StudioError(f"gradual pruning needs 1 or more steps, not {self.steps}")
        if not 0.0 <= self.start_fraction < 1.0:
            raise StudioError("the start fraction of gradual pruning must be in [0, 1)")
        if not self.plan.active():
            raise StudioError("the plan prunes nothing: every ratio is 0")

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain values (kept in checkpoints to recognise the run)."""
        return {
            "plan": self.plan.to_dict(),
            "steps": self.steps,
            "start_fraction": self.start_fraction,
        }

    def scale(self, k: int) -> float:
        """Fraction of the final ratios applied after pruning step ``k`` (0 = none yet)."""
        if k <= 0:
            return 0.0
        f = self.start_fraction
        return f + (1.0 - f) * (1.0 - (1.0 - min(k, self.steps) / self.steps) ** 3)

    def step_at(self, k: int, total_steps: int) -> int:
        """Global training step before which pruning step ``k`` (1-based) is applied."""
        return int((k - 1) * RAMP * total_steps / self.steps)

    def step_plan(self, k: int, original: dict[str, int], current: dict[str, int]) -> PruningPlan:
        """The plan for pruning step ``k`` applied to the current model.

        ``original`` and ``current`` map each structured target to its channel count in the
        unpruned and the current model (ignored for unstructured/N:M, whose ratios are
        fractions of all weights, zeros included, so the weights zeroed before are chosen
        again first).
        """
        scale = self.scale(k)
        if self.plan.method != "structured":
            ratios = {n: r * scale for n, r in self.plan.active().items()}
            return replace(self.plan, ratios=ratios, model_fingerprint="", cap=1.0)
        ratios = {}
        for name, final in self.plan.active().items():
            total, now = original.get(name), current.get(name)
            if not total or not now:
                continue
            removed_now = total - now
            goal = channels_to_prune(total, final * scale)
            if goal > removed_now:
                ratios[name] = (goal - removed_now) / now
        return replace(self.plan, ratios=ratios, model_fingerprint="", cap=1.0)


def channel_units(module: torch.nn.Module, name: str, channels: int) -> int:
    """Channels of a group counted as the engine counts them: per head dimension for a fused
    q/k/v projection (the same dimensions go in every head and in q, k and v)."""
    layout = head_layout(module, name)
    return channels // layout[0] // layout[1] if layout else channels
