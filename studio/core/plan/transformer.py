"""Plans for transformers: how many head groups and MLP neurons each layer keeps, allocated to
a parameter (or MAC) target uniformly or by measured sensitivity.

A transformer plan is a :class:`PruningPlan` of method ``structured`` whose ratios are keyed by
the attention module (the fraction of head groups removed; a group is a key/value head with
its query heads) and the MLP module (the fraction of intermediate neurons removed) of each
layer, so recipes, the Planner's table and ``studio prune`` treat it as any other plan. Depth
pruning (whole layers) is a ``blocks`` plan keyed by the layer modules.

``sensitivity`` allocation is greedy on measured drops (:mod:`studio.core.scan.heads`): each
step removes the head group or MLP slice with the least predicted increase in loss per
parameter saved, until the target is met. Drops of different units in one layer are taken as
additive, as AIMET's and LLM-Pruner's allocations take them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from studio.core.errors import StudioError
from studio.core.models import hf_arch
from studio.core.models.loaded import LoadedModel
from studio.core.plan.plan import PruningPlan
from studio.core.scan.heads import HeadScan

MLP_SLICES = 16  # the MLP of a layer is allocated in sixteenths (rounded to MLP_ALIGN)
MLP_ALIGN = 8
MAX_MLP_RATIO = 0.875


@dataclass(frozen=True)
class LayerUnits:
    """One layer as the allocator sees it."""

    attention: str  # plan key (module name in the loaded model)
    mlp: str
    groups: int
    group_params: int
    neurons: int
    neuron_params: int
    group_macs: int = 0  # per sequence of the model's length, in the projections
    neuron_macs: int = 0


def prefix_of(model: LoadedModel) -> str:
    """Block names are relative to the wrapped transformers model, kept as ``.hf``."""
    return "hf."


def layer_units(model: LoadedModel) -> list[LayerUnits]:
    hf = getattr(model.module, "hf", None)
    if hf is None:
        raise StudioError(f"{model.name} is not a transformer from a Hugging Face folder")
    named = dict(hf.named_modules())
    units = []
    for b in hf_arch.blocks(hf):
        hidden = _width(named[b.out_proj], out=True)
        per = b.heads // b.kv_heads
        group = hidden * b.head_dim * (2 * per + 2)  # q and o for each query head, k and v
        mlp_mods = sum(1 for _ in _mlp_inputs(named, b))
        neuron = hidden * (mlp_mods + 1)
        # MACs as ``studio info`` counts them: the layers' (the projections'); the products
        # of queries and keys inside attention belong to no layer and are not counted
        tokens = int(model.input_shape[-1]) if model.is_text else _patches(hf)
        units.append(
            LayerUnits(
                attention=prefix_of(model) + b.attention,
                mlp=prefix_of(model) + b.mlp,
                groups=b.kv_heads,
                group_params=group,
                neurons=b.intermediate,
                neuron_params=neuron,
                group_macs=tokens * group,
                neuron_macs=tokens * neuron,
            )
        )
    return units


def _patches(hf) -> int:
    """Tokens a ViT sees: its patches and the class token."""
    cfg = hf.config
    return (int(cfg.image_size) // int(cfg.patch_size)) ** 2 + 1


def _width(layer, out: bool) -> int:
    """Output (or input) features of a Linear or GPT-2 Conv1D."""
    w = layer.weight
    if type(layer).__name__ == "Conv1D":
        return int(w.shape[1] if out else w.shape[0])
    return int(w.shape[0] if out else w.shape[1])


def _mlp_inputs(named, block):
    """The projections that make the MLP's neurons (gate and up, or the one up)."""
    base = block.mlp
    for suffix in ("gate_proj", "up_proj", "c_fc", "dense", "fc1"):
        if f"{base}.{suffix}" in named:
            yield suffix


def transformer_targets(model: LoadedModel) -> list[str]:
    """Plan keys in model order: each layer's attention, then its MLP."""
    return [key for u in layer_units(model) for key in (u.attention, u.mlp)]


def removed_groups(ratio: float, groups: int) -> int:
    """Head groups a ratio removes (at least one group always stays)."""
    return min(groups - 1, int(round(ratio * groups)))


def removed_neurons(ratio: float, neurons: int) -> int:
    """MLP neurons a ratio removes, on MLP_ALIGN boundaries of the neurons kept."""
    keep = neurons - int(round(ratio * neurons))
    if keep < neurons and neurons >= 2 * MLP_ALIGN:
        keep = max(MLP_ALIGN, int(round(keep / MLP_ALIGN)) * MLP_ALIGN)
    return neurons - max(1, keep)


def params_removed(units: list[LayerUnits], ratios: dict[str, float], kind: str = "params") -> int:
    """Parameters (or MACs per sequence) a plan removes."""
    total = 0
    for u in units:
        group, neuron = (u.group_macs, u.neuron_macs) if kind == "macs" else (
            u.group_params, u.neuron_params
        )  # fmt: skip
        total += removed_groups(ratios.get(u.attention, 0.0), u.groups) * group
        total += removed_neurons(ratios.get(u.mlp, 0.0), u.neurons) * neuron
    return total


def total_macs(model: LoadedModel) -> int:
    """MACs of one sequence, as ``studio info`` counts them."""
    from studio.core.models.inventory import layer_rows, trace_layers

    _, macs = trace_layers(model.module, model.example_input())
    return sum(macs.get(name, 0) for name, _ in layer_rows(model.module, macs))


def allocate_transformer(
    model: LoadedModel,
    params_fraction: float,
    strategy: str = "sensitivity",
    scan: HeadScan | None = None,
    heads: bool = True,
    mlp: bool = True,
    base: PruningPlan | None = None,
    kind: str = "params",
) -> PruningPlan:
    """Ratios that keep at most ``params_fraction`` of the model's parameters (``kind``
    "macs": of its MACs per sequence).

    ``uniform``: one fraction for every layer (head groups rounded to whole groups);
    ``sensitivity``: greedy on ``scan``'s measured drops. Units that ``base`` locks keep its
    ratios and count towards the target."""
    if not 0.0 < params_fraction < 1.0:
        raise StudioError(f"the parameter target must be between 0 and 1, not {params_fraction}")
    if not (heads or mlp):
        raise StudioError("nothing to allocate: enable heads, MLP neurons or both")
    units = layer_units(model)
    if kind == "macs":
        total = total_macs(model)
    else:
        total = sum(p.numel() for p in model.module.parameters())
    need = total * (1.0 - params_fraction)
    fixed = {n: base.ratio(n) for n in base.locked} if base is not None else {}
    keys = [k for u in units for k, on in ((u.attention, heads), (u.mlp, mlp)) if on]
    if keys and all(k in fixed for k in keys):
        raise StudioError("every layer is locked: there is nothing to allocate")
    if strategy == "uniform":
        ratios = _uniform(units, need, heads, mlp, kind, fixed)
    elif strategy == "sensitivity":
        if scan is None:
            raise StudioError("sensitivity allocation needs a transformer scan")
        if len(scan.layers) != len(units):
            raise StudioError("the scan was made for another model (its layers differ)")
        ratios = _greedy(units, scan, need, heads, mlp, kind, fixed)
    else:
        raise StudioError(f"unknown allocation {strategy!r}: choose uniform or sensitivity")
    removed = params_removed(units, ratios, kind)
    if removed + 1e-9 < need * 0.98:
        what = "MACs" if kind == "macs" else "parameters"
        raise StudioError(
            f"cannot reach {params_fraction:.0%} of the {what} by pruning "
            f"{'heads and MLP neurons' if heads and mlp else 'heads' if heads else 'MLP neurons'}"
            f": at most {(total - removed) / total:.0%} (embeddings and norms stay"
            f"{', locked layers keep their ratios' if fixed else ''})"
        )
    plan = base or PruningPlan(
        method="structured", criterion="activation", recalibrate_bn=False, cap=1.0
    )
    target = {kind: params_fraction, "allocate": strategy}
    from dataclasses import replace

    return replace(plan, ratios=ratios, target=target, model_fingerprint=model.fingerprint())


def _uniform(
    units: list[LayerUnits],
    need: float,
    heads: bool,
    mlp: bool,
    kind: str,
    fixed: dict[str, float],
) -> dict[str, float]:
    best: dict[str, float] = {}
    for f in np.linspace(0.0, MAX_MLP_RATIO, 141):
        ratios = dict(fixed)
        for u in units:
            if heads and u.attention not in fixed:
                ratios[u.attention] = removed_groups(float(f), u.groups) / u.groups
            if mlp and u.mlp not in fixed:
                ratios[u.mlp] = removed_neurons(float(f), u.neurons) / u.neurons
        best = ratios
        if params_removed(units, ratios, kind) >= need:
            break
    return best


def _greedy(
    units: list[LayerUnits],
    scan: HeadScan,
    need: float,
    heads: bool,
    mlp: bool,
    kind: str,
    fixed: dict[str, float],
) -> dict[str, float]:
    def cost_of(u: LayerUnits) -> tuple[int, int]:
        return (
            (u.group_macs, u.neuron_macs) if kind == "macs" else (u.group_params, u.neuron_params)
        )

    groups_off = [0] * len(units)
    slices_off = [0] * len(units)
    curve_x = [0.0, *scan.mlp_ratios]

    def mlp_drop(i: int, ratio: float) -> float:
        ys = [0.0, *np.nan_to_num(scan.mlp_drop[i], nan=np.inf)]
        return float(np.interp(ratio, curve_x, ys))

    def ratios() -> dict[str, float]:
        out = dict(fixed)
        for i, u in enumerate(units):
            if heads and u.attention not in fixed:
                out[u.attention] = groups_off[i] / u.groups
            if mlp and u.mlp not in fixed:
                out[u.mlp] = min(MAX_MLP_RATIO, slices_off[i] / MLP_SLICES)
        return out

    removed = params_removed(units, ratios(), kind)
    while removed < need:
        best, best_cost = None, np.inf
        for i, u in enumerate(units):
            if heads and u.attention not in fixed and groups_off[i] < u.groups - 1:
                g = scan.group_order(i)[groups_off[i]]
                cost = max(float(np.nan_to_num(scan.head_drop[i, g], nan=np.inf)), 0.0)
                per = (cost + 1e-9) / cost_of(u)[0]
                if per < best_cost:
                    best, best_cost = ("heads", i), per
            if (
                mlp
                and u.mlp not in fixed
                and (slices_off[i] + 1) / MLP_SLICES <= MAX_MLP_RATIO + 1e-9
            ):
                before = removed_neurons(slices_off[i] / MLP_SLICES, u.neurons)
                after = removed_neurons((slices_off[i] + 1) / MLP_SLICES, u.neurons)
                if after > before:
                    cost = max(
                        mlp_drop(i, (slices_off[i] + 1) / MLP_SLICES)
                        - mlp_drop(i, slices_off[i] / MLP_SLICES),
                        0.0,
                    )
                    per = (cost + 1e-9) / ((after - before) * cost_of(u)[1])
                    if per < best_cost:
                        best, best_cost = ("mlp", i), per
        if best is None:
            break
        unit, i = best
        if unit == "heads":
            groups_off[i] += 1
        else:
            slices_off[i] += 1
        removed = params_removed(units, ratios(), kind)
    return ratios()


def predicted_loss_drop(scan: HeadScan, units: list[LayerUnits], ratios: dict[str, float]) -> float:
    """The scan's predicted loss increase for a plan (additive over units)."""
    total = 0.0
    xs = [0.0, *scan.mlp_ratios]
    for i, u in enumerate(units):
        off = removed_groups(ratios.get(u.attention, 0.0), u.groups)
        for g in scan.group_order(i)[:off]:
            total += max(0.0, float(scan.head_drop[i, g]))
        r = removed_neurons(ratios.get(u.mlp, 0.0), u.neurons) / u.neurons
        total += max(0.0, float(np.interp(r, xs, [0.0, *scan.mlp_drop[i]])))
    return total
