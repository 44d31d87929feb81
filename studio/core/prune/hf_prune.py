"""Applying a plan to a Hugging Face transformer (the engine's path for ``huggingface`` models).

``structured`` plans remove head groups and MLP neurons per layer
(:mod:`studio.core.plan.transformer` says how a ratio becomes a count); ``blocks`` plans
remove whole layers. What goes is chosen on data when data is given, as the scan measured it:
head groups by the loss with the group alone switched off, neurons by mean |activation| times
the norm of their down-projection column (Wanda's score). Without data, by weight magnitude.
The surgery itself is :mod:`studio.core.prune.transformer`; the pruned model's config says
what it now is, so it saves with ``save_pretrained`` and reloads.
"""

from __future__ import annotations

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import hf_arch
from studio.core.models.data import DataSet
from studio.core.plan.costs import BLOCK_REMOVED
from studio.core.plan.plan import PruningPlan
from studio.core.plan.transformer import removed_groups, removed_neurons
from studio.core.prune import transformer as surgery
from studio.core.scan.heads import _Meter, group_mask, masked_inputs, neuron_importance

IMPORTANCE_SEQUENCES = 16


def hf_targets(module: nn.Module, method: str) -> list[str]:
    hf = _hf(module)
    blocks = hf_arch.blocks(hf)
    if method == "blocks":
        return ["hf." + b.name for b in blocks]
    if method == "structured":
        return [f"hf.{name}" for b in blocks for name in (b.attention, b.mlp)]
    raise StudioError(
        f"{method} pruning of transformers is not built: use structured (heads and MLP "
        "neurons) or blocks (whole layers)"
    )


def apply_hf_plan(
    module: nn.Module,
    plan: PruningPlan,
    data: DataSet | None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Prune ``module`` (an :class:`~studio.core.models.hf.HFModule`) in place by ``plan``;
    returns (skipped targets with reasons, notes)."""
    hf = _hf(module)
    prefix = "hf."
    blocks = hf_arch.blocks(hf)
    notes: list[str] = []
    skipped: list[tuple[str, str]] = []
    if plan.method == "blocks":
        drop = [b.index for b in blocks if plan.ratio(prefix + b.name) >= BLOCK_REMOVED]
        if len(drop) >= len(blocks):
            raise StudioError("a plan cannot remove every layer of the model")
        if drop:
            surgery.drop_layers(hf, drop)
            notes.append(f"{len(drop)} of {len(blocks)} layers removed")
        surgery.update_config(hf)
        return skipped, notes
    batches = []
    if data is not None and len(data):
        sub = data.subset(min(len(data), IMPORTANCE_SEQUENCES))
        batches = [sub.x[i : i + 8] for i in range(0, len(sub), 8)]
    neuron_scores = neuron_importance(module, blocks, batches) if batches else None
    meter = _Meter(module, sub, 8) if batches else None
    base = meter.loss() if meter is not None else 0.0
    heads_removed = neurons_removed = 0
    for i, b in enumerate(blocks):
        check(cancel)
        report(progress, i / max(1, len(blocks)), b.name)
        off_groups = removed_groups(plan.ratio(prefix + b.attention), b.kv_heads)
        off_neurons = removed_neurons(plan.ratio(prefix + b.mlp), b.intermediate)
        if off_groups:
            if meter is not None:  # the loss with each group alone switched off
                drops = []
                for g in range(b.kv_heads):
                    with masked_inputs(module, {prefix + b.out_proj: group_mask(b, [g])}):
                        drops.append(meter.loss() - base)
                scores = torch.tensor(drops)
            else:
                scores = surgery.head_scores(hf, b.index)
            keep = sorted(
                int(g) for g in torch.argsort(scores, descending=True)[: b.kv_heads - off_groups]
            )
            surgery.prune_heads(hf, b.index, keep)
            heads_removed += off_groups * (b.heads // b.kv_heads)
        if off_neurons:
            scores = (
                neuron_scores[i]
                if neuron_scores is not None
                else surgery.neuron_scores(hf, b.index)
            )
            keep = sorted(
                int(j)
                for j in torch.argsort(scores, descending=True)[: b.intermediate - off_neurons]
            )
            surgery.prune_mlp(hf, b.index, keep)
            neurons_removed += off_neurons
    surgery.update_config(hf)
    how = (
        "on data (measured loss per head group; activation x weight per neuron)"
        if batches
        else "by weight magnitude (no data)"
    )
    notes.append(
        f"{heads_removed} attention heads and {neurons_removed} MLP neurons removed, chosen {how}"
    )
    report(progress, 1.0, "done")
    return skipped, notes


def _hf(module: nn.Module) -> nn.Module:
    hf = getattr(module, "hf", None)
    if hf is None:
        raise StudioError("not a transformer from a Hugging Face folder")
    return hf


__all__ = ["apply_hf_plan", "hf_targets"]
