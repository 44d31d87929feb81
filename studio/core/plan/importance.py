"""Normalised importance of every channel (structured) or weight (unstructured) of a model,
for global-threshold allocation: one threshold across layers keeps what matters most overall.

Scores follow the plan's criterion: L1/L2 magnitude (Torch-Pruning's group magnitude
importance for channels, as the sensitivity scan uses), BN scale (groups without a batch norm
fall back to L2), first-order Taylor ``|w . g|`` (needs data: gradients are taken on a copy of
the model), APoZ / mean activation (structured only, measured on data), or random (the plan's
seed). Each target's scores are divided by their mean, as
Torch-Pruning's global pruning does, so that layers of different scale compare.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import StudioError
from studio.core.models import graph
from studio.core.models.activations import ACTIVATION_CRITERIA, group_scores
from studio.core.models.data import DataSet
from studio.core.plan.costs import CostModel

GRAD_SAMPLES = 256  # taylor: samples the gradients are averaged over
GRAD_BATCH = 64


def normalised_scores(
    cost: CostModel,
    criterion: str,
    seed: int = 0,
    module: nn.Module | None = None,
    data: DataSet | None = None,
) -> dict[str, np.ndarray]:
    """Sorted mean-normalised scores of each target's channels or weights."""
    if cost.method not in ("structured", "unstructured"):
        raise StudioError(
            f"global allocation ranks channels or weights; {cost.method} plans are allocated "
            "by uniform or sensitivity"
        )
    module = module if module is not None else cost.module
    if module is None:
        raise StudioError("global allocation needs the model to rank channels or weights")
    if criterion == "taylor":
        if data is None or len(data) == 0:
            raise StudioError("the taylor criterion needs data to rank channels (--data)")
        module = _with_gradients(module, data)
    rng = np.random.default_rng(seed)
    if criterion in ACTIVATION_CRITERIA:
        raw = _activation_scores(cost, module, criterion, data)
    elif cost.method == "structured":
        raw = _channel_scores(cost, module, criterion, rng)
    else:
        raw = _weight_scores(cost, module, criterion, rng)
    out = {}
    for name, scores in raw.items():
        scores = np.nan_to_num(np.abs(np.asarray(scores, float)))
        mean = scores.mean() if scores.size else 0.0
        out[name] = np.sort(scores / mean if mean > 0 else scores)
    return out


def _channel_scores(
    cost: CostModel, module: nn.Module, criterion: str, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    import torch_pruning as tp

    groups = cost.groups
    if module is not cost.module:  # another copy (taylor): its own Torch-Pruning groups
        assert cost.example_input is not None
        outputs = graph.output_layers(module, cost.example_input)
        _, traced = graph.traced_groups(module, cost.example_input, ignored=outputs)
        groups = {info.root: group for info, group in traced}
    magnitude = tp.importance.GroupMagnitudeImportance(
        p=1 if criterion == "l1" else 2, normalizer=None
    )
    chosen = {
        "taylor": tp.importance.GroupTaylorImportance(normalizer=None),
        "bn_scale": tp.importance.BNScaleImportance(normalizer=None),
    }.get(criterion, magnitude)
    scores = {}
    for target in cost.targets:
        group = groups.get(target.name)
        if group is None:
            raise StudioError(f"group {target.name} is not in the model given for ranking")
        if criterion == "random":
            scores[target.name] = rng.random(target.size)
            continue
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = chosen(group)
            if value is None:  # no batch norm in the group
                value = magnitude(group)
        scores[target.name] = value.detach().double().cpu().numpy()
    return scores


def _activation_scores(
    cost: CostModel, module: nn.Module, criterion: str, data: DataSet | None
) -> dict[str, np.ndarray]:
    """APoZ (as 1 - APoZ) or mean-activation scores of every group, measured on data."""
    if cost.method != "structured":
        raise StudioError(f"the {criterion} criterion ranks channels: use a structured plan")
    if data is None or len(data) == 0:
        raise StudioError(f"the {criterion} criterion measures activations on data (--data)")
    assert cost.example_input is not None
    copied = copy.deepcopy(module).eval()
    outputs = graph.output_layers(copied, cost.example_input)
    _, traced = graph.traced_groups(copied, cost.example_input, ignored=outputs)
    infos = {info.root: info for info, _ in traced}
    wanted = [infos[t.name] for t in cost.targets if t.name in infos]
    members = {info.root: info.members for info in wanted}
    channels = {info.root: info.channels for info in wanted}
    scores = group_scores(copied, data, members, channels, criterion)
    out = {}
    for target in cost.targets:
        value = scores.get(target.name)
        out[target.name] = np.ones(target.size) if value is None else value
    return out


def _weight_scores(
    cost: CostModel, module: nn.Module, criterion: str, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    mods = dict(module.named_modules())
    scores = {}
    for target in cost.targets:
        weight = mods[target.name].weight
        w = weight.detach().double()
        if criterion == "random":
            scores[target.name] = rng.random(target.size)
        elif criterion == "taylor" and weight.grad is not None:
            scores[target.name] = (w * weight.grad.double()).abs().flatten().numpy()
        elif criterion == "l1":
            scores[target.name] = w.abs().flatten().numpy()
        else:  # l2, and bn_scale (which ranks channels, not weights)
            scores[target.name] = (w * w).flatten().numpy()
    return scores


def _with_gradients(module: nn.Module, data: DataSet) -> nn.Module:
    """A copy of ``module`` whose parameters hold the mean loss gradient over a few batches."""
    replica = copy.deepcopy(module).eval()
    x, y = data.x[:GRAD_SAMPLES], None if data.y is None else data.y[:GRAD_SAMPLES]
    batches = range(0, len(x), GRAD_BATCH)
    try:
        with torch.enable_grad():
            for p in replica.parameters():
                p.requires_grad_(True)
                p.grad = None
            for i in batches:
                out = replica(x[i : i + GRAD_BATCH])
                labels = out.detach().argmax(1) if y is None else y[i : i + GRAD_BATCH]
                (F.cross_entropy(out, labels) / len(batches)).backward()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StudioError(f"gradients for the taylor criterion failed: {first}"[:200]) from None
    return replica
