"""What the Planner knows of a transformer from a Hugging Face folder: its head groups and MLP
neurons per layer, what a plan keeps of them, and the scan's predicted loss (no Qt here).

A transformer plan is an ordinary structured :class:`PruningPlan` keyed by each layer's
attention module (fraction of head groups removed) and MLP module (fraction of neurons
removed); :mod:`studio.core.plan.transformer` says how a ratio becomes a count.
:class:`TransformerCost` stands where the CNN planner has a
:class:`~studio.core.plan.costs.CostModel`: the same ``targets``/``predict`` the planner state
and the recipes use: MACs of one sequence with the core's ``params_removed`` (as ``studio
info`` and the engine count them), parameters with the core's unit sizes plus the biases a head
group or neuron owns (q/k/v and MLP-input biases of GPT-2, BERT, Qwen2, which the core's
``LayerUnits`` leave out), so the summary is what Apply measures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from studio.core.models import hf_arch
from studio.core.models.data import DataSet
from studio.core.models.loaded import HUGGINGFACE, LoadedModel
from studio.core.plan.allocate import PlanTarget
from studio.core.plan.plan import PruningPlan
from studio.core.plan.transformer import (
    MLP_ALIGN,
    LayerUnits,
    layer_units,
    params_removed,
    predicted_loss_drop,
    removed_groups,
    removed_neurons,
    total_macs,
)
from studio.core.scan.heads import HeadScan
from studio.ui import format as fmt


def is_transformer(model: LoadedModel | None) -> bool:
    """A model the Planner plans by head groups and MLP neurons."""
    return model is not None and model.kind == HUGGINGFACE and hasattr(model.module, "hf")


def base_plan(model: LoadedModel, has_data: bool) -> PruningPlan:
    """The plan a transformer starts from (as ``studio prune`` makes it): structured, no cap
    beyond the engine's own (one head group and a few neurons always stay), no batch norms;
    what goes is chosen on data when there is data, else by weight magnitude."""
    return PruningPlan(
        method="structured",
        criterion="activation" if has_data else "l2",
        cap=1.0,
        recalibrate_bn=False,
        model_fingerprint=model.fingerprint(),
    )


def text_splits(session: Any) -> tuple[DataSet | None, DataSet | None]:
    """(calibration, validation) of the session's data: text data keeps its calibration split
    beside the validation split the session evaluates on (as ``--data`` does in the CLI);
    other data is both."""
    data, calibration = session.data, session.calibration
    return (calibration if calibration is not None else data), data


@dataclass(frozen=True)
class LayerRow:
    """One row of the Planner's transformer table."""

    name: str  # the layer module, e.g. "model.layers.3"
    units: LayerUnits
    heads_per_group: int
    group_params: int  # parameters one head group owns, biases included
    neuron_params: int

    @property
    def params(self) -> int:
        u = self.units
        return u.groups * self.group_params + u.neurons * self.neuron_params

    def params_removed(self, plan: Mapping[str, float]) -> int:
        u = self.units
        return (
            removed_groups(plan.get(u.attention, 0.0), u.groups) * self.group_params
            + removed_neurons(plan.get(u.mlp, 0.0), u.neurons) * self.neuron_params
        )

    @property
    def neuron_step(self) -> int:
        """Neurons per MLP slider step: the engine keeps multiples of MLP_ALIGN."""
        return MLP_ALIGN if self.units.neurons >= 2 * MLP_ALIGN else 1

    def groups_kept(self, plan: PruningPlan) -> int:
        u = self.units
        return u.groups - removed_groups(plan.ratio(u.attention), u.groups)

    def neurons_kept(self, plan: PruningPlan) -> int:
        u = self.units
        return u.neurons - removed_neurons(plan.ratio(u.mlp), u.neurons)

    def heads_ratio(self, groups_kept: int) -> float:
        """The attention ratio that keeps ``groups_kept`` whole groups."""
        g = self.units.groups
        return (g - max(1, min(g, groups_kept))) / g

    def mlp_ratio(self, neurons_kept: int) -> float:
        n = self.units.neurons
        return (n - max(1, min(n, neurons_kept))) / n

    def heads_text(self, groups_kept: int) -> str:
        """``6/8 heads (kv 3/4)``; without grouped attention ``6/8 heads``."""
        per, groups = self.heads_per_group, self.units.groups
        text = f"{groups_kept * per}/{groups * per} heads"
        return text + (f" (kv {groups_kept}/{groups})" if per > 1 else "")

    def mlp_text(self, neurons_kept: int) -> str:
        n = self.units.neurons
        return f"{neurons_kept / n:.0%} ({neurons_kept:,}/{n:,})"


class TransformerCost:
    """Parameters a transformer plan keeps, for the planner state and the table.

    Duck-types the parts of :class:`~studio.core.plan.costs.CostModel` the planner reads:
    ``method``, ``targets``, ``names``, ``params_before``, ``macs_before`` and ``predict``.
    """

    method = "structured"

    def __init__(self, rows: list[LayerRow], params_before: int, macs_before: int) -> None:
        self.rows = rows
        self.units = [r.units for r in rows]
        self.params_before = params_before
        self.macs_before = macs_before
        self.targets = [
            target
            for r in rows
            for target in (
                PlanTarget(
                    r.units.attention,
                    (r.units.attention,),
                    r.units.groups,
                    r.units.groups * r.group_params,
                    r.units.groups * r.units.group_macs,
                ),
                PlanTarget(
                    r.units.mlp,
                    (r.units.mlp,),
                    r.units.neurons,
                    r.units.neurons * r.neuron_params,
                    r.units.neurons * r.units.neuron_macs,
                ),
            )
        ]
        self.names = [t.name for t in self.targets]

    @classmethod
    def build(cls, model: LoadedModel) -> TransformerCost:
        """From the model's layers, and one traced sequence for the MACs (hooks: give it a
        replica that nothing else runs)."""
        units = layer_units(model)
        hf = model.module.hf
        blocks = hf_arch.blocks(hf)
        rows = []
        for b, u in zip(blocks, units, strict=True):
            group_bias, neuron_bias = _unit_biases(hf, b)
            per = max(1, b.heads // max(1, b.kv_heads))
            rows.append(
                LayerRow(b.name, u, per, u.group_params + group_bias, u.neuron_params + neuron_bias)
            )
        params = sum(p.numel() for p in model.module.parameters())
        return cls(rows, params, total_macs(model))

    def predict(self, ratios: Mapping[str, float]) -> tuple[int, int]:
        """(parameters, MACs of one sequence) after the plan's ratios."""
        ratios = dict(ratios)
        return (
            self.params_before - sum(r.params_removed(ratios) for r in self.rows),
            self.macs_before - params_removed(self.units, ratios, "macs"),
        )

    def kept(self, plan: PruningPlan) -> tuple[int, int, int, int]:
        """(heads kept, heads, MLP neurons kept, MLP neurons) over all layers."""
        heads = sum(r.units.groups * r.heads_per_group for r in self.rows)
        kept_heads = sum(r.groups_kept(plan) * r.heads_per_group for r in self.rows)
        neurons = sum(r.units.neurons for r in self.rows)
        kept_neurons = sum(r.neurons_kept(plan) for r in self.rows)
        return kept_heads, heads, kept_neurons, neurons

    def fits(self, scan: Any) -> bool:
        """Whether ``scan`` is a transformer scan of a model shaped like this one."""
        return (
            isinstance(scan, HeadScan)
            and len(scan.layers) == len(self.rows)
            and list(scan.groups) == [r.units.groups for r in self.rows]
        )

    def predicted_drops(
        self, scan: HeadScan, ratios: Mapping[str, float]
    ) -> tuple[float, dict[str, float]]:
        """The scan's predicted loss increase of the plan, and of each target alone (additive,
        as the allocator takes them)."""
        ratios = dict(ratios)
        total = predicted_loss_drop(scan, self.units, ratios)
        each = {
            name: predicted_loss_drop(scan, self.units, {name: r}) for name, r in ratios.items()
        }
        return total, each


def _unit_biases(hf: Any, block: hf_arch.Block) -> tuple[int, int]:
    """Bias entries one head group and one MLP neuron own: the q/k/v outputs of the group's
    heads, and one per MLP input projection (the output projections' biases stay)."""
    layout = hf_arch.layout_of(hf)
    layer = hf_arch.submodule(hf, block.name)

    def bias(path: str | None) -> int:
        module = hf_arch.submodule(layer, path) if path and layer is not None else None
        return int(module is not None and getattr(module, "bias", None) is not None)

    per = max(1, block.heads // max(1, block.kv_heads))
    if layout.qkv:  # GPT-2's fused q|k|v: no grouped attention
        group = 3 * per * block.head_dim * bias(layout.qkv)
    else:
        group = block.head_dim * (per * bias(layout.q) + bias(layout.k) + bias(layout.v))
    return group, sum(bias(path) for path in layout.mlp_in)


def head_scan_cached(model: LoadedModel, data: DataSet) -> bool:
    """Whether the default head scan of ``model`` on ``data`` would load from its cache."""
    from studio.core.scan.heads import is_cached

    return is_cached(model, data)


def shown_drop(scan: HeadScan, loss_drop: float) -> float:
    """A loss increase as the user reads it: perplexity increase (LMs), cosine lost."""
    if scan.metric != "perplexity":
        return loss_drop
    return math.exp(scan.baseline + loss_drop) - math.exp(scan.baseline)


def drop_text(scan: HeadScan, loss_drop: float) -> str:
    value = shown_drop(scan, loss_drop)
    return f"+{value:.3g} ppl" if scan.metric == "perplexity" else f"{value:.3g} cos"


def summary_parts(cost: TransformerCost, plan: PruningPlan, scan: HeadScan | None) -> list[str]:
    """The Planner strip for a transformer: parameters and MACs before -> after, heads and
    neurons kept, predicted perplexity (or cosine) from the transformer scan."""
    kept_heads, heads, kept_neurons, neurons = cost.kept(plan)
    params, macs = cost.predict(plan.active())
    before = cost.params_before
    parts = [
        f"<b>Parameters</b> {before:,} → {params:,} ({params / max(before, 1):.1%} kept)",
        f"<b>MACs</b> {fmt.compact(cost.macs_before)} → {fmt.compact(macs)} "
        f"({macs / max(cost.macs_before, 1):.1%}, one sequence)",
        f"<b>Heads</b> {kept_heads:,}/{heads:,}",
        f"<b>MLP neurons</b> {kept_neurons:,}/{neurons:,}",
    ]
    if scan is None:
        parts.append(
            "<b>Predicted drop</b>: allocate by sensitivity (runs the transformer scan) to see it"
        )
        return parts
    drop, _ = cost.predicted_drops(scan, plan.active())
    if scan.metric == "perplexity":
        base = scan.baseline_shown
        parts.append(
            f"<b>Predicted perplexity</b> {base:.4g} → {base + shown_drop(scan, drop):.4g} "
            "(sum of the scan's per-unit increases)"
        )
    else:
        parts.append(f"<b>Predicted cosine lost</b> {drop:.3g} (sum of the scan's per-unit drops)")
    return parts


def result_text(result: Any) -> str:
    """One line for an applied transformer plan: parameters and perplexity (or cosine)."""
    text = (
        f"Pruned: parameters {result.params_before:,} → {result.params_after:,} "
        f"({result.params_after / max(result.params_before, 1):.1%}), MACs "
        f"{fmt.compact(result.macs_before)} → {fmt.compact(result.macs_after)}"
    )
    before, after = result.quality_before, result.quality_after
    if before is not None and after is not None:
        for key, label in (("perplexity", "perplexity"), ("cosine", "cosine to the original")):
            b, a = getattr(before, key, None), getattr(after, key, None)
            if b is not None and a is not None:
                return f"{text}; {label} {b:.4g} → {a:.4g} on {after.samples:,} sequences"
    return text
