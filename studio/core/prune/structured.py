"""Structured pruning: channels removed physically through Torch-Pruning's dependency graph.

Channels are ranked on the unpruned model, for every group before any is pruned, the way the
structured sensitivity scan ranks them (L1/L2 group magnitude, the same selection rule and the
same per-head rule for fused attention projections), so the scan predicts what pruning does.
The activation criteria (APoZ, mean activation) measure the groups' layers on data in one
pass (:mod:`studio.core.models.activations`).
Groups are then pruned one at a time; after each, a forward pass checks the model still runs
with the same output shape. A group that breaks it is rolled back (the state of every layer
was kept) and reported with the reason; the rest of the plan still applies.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from studio.core.errors import StudioError, first_line
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import graph
from studio.core.models.activations import ACTIVATION_CRITERIA, group_scores
from studio.core.models.blocks import output_shape
from studio.core.models.data import DataSet
from studio.core.plan.plan import PruningPlan
from studio.core.prune.weights import gradient_pass
from studio.core.scan.masks import channels_to_prune

Skipped = list[tuple[str, str]]
Traced = tuple[Any, list[tuple[graph.DependencyGroup, Any]]]  # graph, [(group info, tp group)]


def trace(
    module: nn.Module, x: torch.Tensor
) -> tuple[Any, list[tuple[graph.DependencyGroup, Any]]]:
    """The dependency graph and prunable groups, output layers left alone (as the scan does)."""
    outputs = graph.output_layers(module, x)
    return graph.traced_groups(module, x, ignored=outputs)


def unprunable_layers(module: nn.Module) -> Skipped:
    """Layers Torch-Pruning cannot prune structurally, with the reason."""
    return [
        (n, graph.UNPRUNABLE[type(m)])
        for n, m in module.named_modules()
        if type(m) in graph.UNPRUNABLE
    ]


def select_channels(module: nn.Module, root: str, scores: Any, ratio: float) -> list[int]:
    """Channels of group ``root`` a ratio removes: the lowest scores, per head for attention."""
    scores = np.asarray(scores, dtype=float)
    layout = graph.head_layout(module, root)
    if layout:  # the same head dimensions in q, k and v, equally in every head
        parts, heads = layout
        per_head = channels_to_prune(len(scores) // parts // heads, ratio)
        return graph.qkv_channels(scores, heads, per_head, parts)
    k = channels_to_prune(len(scores), ratio)
    return sorted(np.argsort(scores, kind="stable")[:k].tolist())


def prune_structured(
    module: nn.Module,
    x: torch.Tensor,
    traced: Traced,
    plan: PruningPlan,
    data: DataSet | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    kept: dict[str, list[int]] | None = None,
) -> tuple[Skipped, list[str]]:
    """Prune ``module`` in place by ``plan``; returns (skipped groups with reasons, notes).
    ``kept``, if given, receives for each layer that lost output channels which of its
    original output channels it kept."""
    kept = {} if kept is None else kept
    names = {m: n for n, m in module.named_modules()}
    dg, groups = traced
    active = plan.active()
    chosen = [(info, group) for info, group in groups if info.root in active]
    notes: list[str] = []
    skipped = unprunable_layers(module) + graph.left_whole(dg)
    report(progress, 0.0, "ranking channels")
    failed: dict[str, str] = {}
    scores = _scores(module, chosen, plan, data, cancel, notes, failed)
    cuts = []
    for info, group in chosen:
        if info.root in failed:
            skipped.append((info.root, failed[info.root]))
            continue
        if scores.get(info.root) is None:
            skipped.append((info.root, "no weights in the group to rank its channels by"))
            continue
        idxs = select_channels(module, info.root, scores[info.root], active[info.root])
        if idxs:
            cuts.append((info.root, group[0].dep.target.module, idxs))
    with torch.no_grad():
        reference = output_shape(module(x))
    for i, (name, root, idxs) in enumerate(cuts):
        check(cancel)
        report(progress, 0.2 + 0.8 * i / len(cuts), name)
        saved = _snapshot(module)
        before = dict(kept)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handler = dg.get_pruner_of_module(root).prune_out_channels
                group = dg.get_pruning_group(root, handler, idxs)
                _record_kept(dg, group, names, kept)
                group.prune(record_history=False)
                with torch.no_grad():
                    shape = output_shape(module(x))
            if shape != reference:
                raise _OutputChanged(f"the output shape changes from {reference} to {shape}")
        except Exception as exc:  # Torch-Pruning and the forward pass raise many kinds
            _restore(module, saved)
            kept.clear()
            kept.update(before)
            skipped.append((name, _reason(exc)))
            dg = graph.build_graph(module, x)  # the old graph may point at replaced tensors
    report(progress, 1.0, f"{len(cuts)} groups")
    return skipped, notes


class _OutputChanged(Exception):
    pass


def _record_kept(
    dg: Any, group: Any, names: dict[nn.Module, str], kept: dict[str, list[int]]
) -> None:
    """Note, before ``group`` prunes, which original output channels each of its layers keeps
    (composed with what an earlier group left of the same layer)."""
    for dep, idxs in group:
        layer = dep.target.module
        if not dg.is_out_channel_pruning_fn(dep.handler) or layer not in names:
            continue
        width = dg.get_pruner_of_module(layer).get_out_channels(layer)
        if not width:
            continue
        gone = {int(getattr(i, "idx", i)) for i in idxs}
        now = [i for i in range(int(width)) if i not in gone]
        name = names[layer]
        previous = kept.get(name)
        kept[name] = [previous[i] for i in now] if previous is not None else now


def _reason(exc: Exception) -> str:
    if isinstance(exc, _OutputChanged):
        return f"rolled back: {exc}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"rolled back: the model no longer runs ({type(exc).__name__}: {first})"[:240]


def _scores(
    module: nn.Module,
    chosen: list[tuple[graph.DependencyGroup, Any]],
    plan: PruningPlan,
    data: DataSet | None,
    cancel: CancelToken | None,
    notes: list[str],
    failed: dict[str, str] | None = None,
) -> dict[str, np.ndarray | None]:
    """Channel scores of every chosen group (lower = pruned first), on the unpruned model.
    A group whose scores cannot be computed is left out and its reason put in ``failed``."""
    failed = {} if failed is None else failed
    import torch_pruning as tp

    criterion = plan.criterion
    if criterion in ACTIVATION_CRITERIA:
        return _activation_scores(module, chosen, criterion, data, cancel, notes)
    if criterion == "random":
        out: dict[str, np.ndarray | None] = {}
        for info, _ in chosen:
            seed = (plan.seed * 1_000_003 + zlib.crc32(info.root.encode())) % (2**63)
            generator = torch.Generator().manual_seed(seed)
            out[info.root] = torch.rand(info.channels, generator=generator).double().numpy()
        return out
    l2 = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if criterion == "l1":
        imp = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    elif criterion == "bn_scale":
        imp = tp.importance.GroupMagnitudeImportance(
            p=1,
            group_reduction="sum",
            normalizer=None,
            target_types=[nn.modules.batchnorm._BatchNorm],
        )
    elif criterion == "taylor":
        if data is None:
            raise StudioError("the taylor criterion needs data for its gradient pass: give --data")
        gradient_pass(module, data, cancel)
        imp = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    else:
        imp = l2
    fallback = []
    out = {}
    try:
        with torch.no_grad():
            for info, group in chosen:
                check(cancel)
                try:
                    scores = imp(group)
                    if scores is None and criterion == "bn_scale":
                        fallback.append(info.root)
                        scores = l2(group)
                except Exception as exc:  # Torch-Pruning indexes layers by its own mapping
                    failed[info.root] = (
                        "left whole: its channels could not be ranked "
                        f"({type(exc).__name__}: {first_line(exc)})"
                    )[:240]
                    continue
                out[info.root] = None if scores is None else scores.double().cpu().numpy()
    finally:
        for p in module.parameters():
            p.grad = None
    if fallback:
        shown = ", ".join(fallback[:3]) + (" …" if len(fallback) > 3 else "")
        notes.append(
            f"{len(fallback)} group(s) have no batch norm, ranked by L2 magnitude instead: {shown}"
        )
    return out


def _activation_scores(
    module: nn.Module,
    chosen: list[tuple[graph.DependencyGroup, Any]],
    criterion: str,
    data: DataSet | None,
    cancel: CancelToken | None,
    notes: list[str],
) -> dict[str, np.ndarray | None]:
    """APoZ or mean-activation scores, measured on ``data``; groups whose layers give no
    activations (none ran, or none has the group's width) are ranked by L2 magnitude."""
    import torch_pruning as tp

    if data is None:
        raise StudioError(f"the {criterion} criterion measures activations on data: give --data")
    members = {info.root: info.members for info, _ in chosen}
    channels = {info.root: info.channels for info, _ in chosen}
    scores = group_scores(module, data, members, channels, criterion, cancel)
    fallback = [info for info, _ in chosen if scores.get(info.root) is None]
    if fallback:
        l2 = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
        groups = dict((info.root, group) for info, group in chosen)
        with torch.no_grad():
            for info in fallback:
                value = l2(groups[info.root])
                scores[info.root] = None if value is None else value.double().cpu().numpy()
        shown = ", ".join(i.root for i in fallback[:3]) + (" …" if len(fallback) > 3 else "")
        notes.append(
            f"{len(fallback)} group(s) gave no activations to rank by, ranked by L2 "
            f"magnitude instead: {shown}"
        )
    return scores


def _snapshot(module: nn.Module) -> list[tuple[nn.Module, dict, dict, dict]]:
    """What Torch-Pruning changes in every layer: attributes, parameters and buffers (it
    replaces tensors rather than editing them, so references are enough)."""
    skip = ("_parameters", "_buffers", "_modules")
    return [
        (
            mod,
            {k: v for k, v in mod.__dict__.items() if k not in skip},
            dict(mod._parameters),
            dict(mod._buffers),
        )
        for mod in module.modules()
    ]


def _restore(module: nn.Module, saved: list[tuple[nn.Module, dict, dict, dict]]) -> None:
    for mod, attrs, params, buffers in saved:
        mod.__dict__.update(attrs)
        mod._parameters.clear()
        mod._parameters.update(params)
        mod._buffers.clear()
        mod._buffers.update(buffers)
