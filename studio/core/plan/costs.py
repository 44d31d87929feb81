"""What a pruning plan leaves of a model: parameters and MACs after pruning, without pruning.

A :class:`CostModel` is built once per model and method (one trace, one dependency graph) and
then answers :meth:`CostModel.predict` from precomputed arrays in microseconds, so the planner
can call it on every slider move. Counts follow :mod:`studio.core.models.inventory` (parameters of
``module.parameters()``, MACs from FlopCounterMode plus one per normalisation output), so the
totals before pruning equal :func:`~studio.core.models.inventory.build_inventory`'s.

- ``structured``: a target is a dependency group (named by its root layer, as in the scan);
  a ratio removes ``channels_to_prune(channels, ratio)`` channels (attention q/k/v: the same
  number of dimensions in every head). Every layer keeps the fraction of output channels of
  the group it is a member of and of input channels of the group(s) it consumes; weights and
  MACs of convolutions and linears scale with both fractions, their biases with the first,
  depthwise convolutions (groups shrink with the channels), normalisation layers and other
  parameters with the fraction of their own group. Exact with respect to physically removing
  the channels; parameter-free modules with MACs of their own count as unchanged except
  attention (its matrix products scale with its ``qkv`` group).
- ``unstructured`` / ``nm``: a target is a Conv/Linear weight; a ratio zeroes
  ``floor(size * ratio)`` weights (nm: ``round(4 * ratio)`` of every 4). Parameters after are
  the parameters not zeroed (a dense model is assumed), MACs after are effective sparse MACs:
  each zeroed weight removes the MACs it took part in.
- ``blocks``: a target is a residual block as the engine finds them
  (:func:`studio.core.models.blocks.find_blocks`); ratio >= 0.5 replaces it by its shortcut and
  removes the parameters and MACs of every layer the shortcut does not use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.models import graph
from studio.core.models.inventory import trace_layers
from studio.core.models.loaded import LoadedModel
from studio.core.plan.plan import METHODS
from studio.core.scan.masks import MASKABLE, nm_view
from studio.core.scan.types import NM_GROUP

BLOCK_REMOVED = 0.5  # a block ratio at or above this replaces the block by its shortcut


@dataclass(frozen=True)
class PlanTarget:
    """One slider of a plan: a dependency group, one weight tensor, or one residual block."""

    name: str
    layers: tuple[str, ...]
    size: int  # channels (structured), weights (unstructured/nm), 1 (blocks)
    params: int  # parameters of the layers the target touches, before pruning
    macs: int  # MACs of the layers the target touches, before pruning


class CostModel:
    """Parameters and MACs of a model after a plan's ratios, predicted from arrays."""

    def __init__(
        self, method: str, targets: list[PlanTarget], params_before: int, macs_before: int
    ) -> None:
        self.method = method
        self.targets = targets
        self.params_before = params_before
        self.macs_before = macs_before
        self.names = [t.name for t in targets]
        self.module: nn.Module | None = None  # the model it was built for (read only)
        self.example_input: torch.Tensor | None = None
        self.groups: dict[str, object] = {}  # structured: target name -> Torch-Pruning group
        self.rows: list[str] = []  # structured: layers whose channels a plan changes
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def build(cls, model: LoadedModel, method: str) -> CostModel:
        """Trace ``model`` once and precompute what :meth:`predict` needs for ``method``."""
        if method not in METHODS:
            raise StudioError(f"unknown pruning method {method!r}: choose one of {METHODS}")
        if method == "structured":
            model.require("structural pruning")
        module = model.module
        x = model.example_input()
        _shapes, macs = trace_layers(module, x)
        params = sum(p.numel() for p in module.parameters())
        total_macs = sum(macs.values())
        build = {"structured": _structured, "blocks": _blocks}.get(method, _weights)
        cost = cls(method, [], params, total_macs)
        cost.module, cost.example_input = module, x
        build(cost, module, x, macs)
        if not cost.targets:
            raise StudioError(f"{model.name} has nothing to prune with the {method} method")
        return cost

    def ratio_vector(self, ratios: Mapping[str, float]) -> np.ndarray:
        """Ratios in target order (0 for targets not named)."""
        get = ratios.get
        return np.fromiter((get(n, 0.0) for n in self.names), float, len(self.names))

    def predict(self, ratios: Mapping[str, float]) -> tuple[int, int]:
        """(parameters, MACs) after pruning every target by its ratio (unnamed targets: 0)."""
        return self.predict_vector(self.ratio_vector(ratios))

    def predict_vector(self, r: np.ndarray) -> tuple[int, int]:
        """:meth:`predict` for ratios already in target order."""
        a = self._arrays
        if self.method == "structured":
            k = a["unit"] * np.clip(np.floor(a["n"] * r + 1e-9), 0.0, a["n"] - 1)
            fo = 1.0 - (a["aout"] @ k) / a["dout"]
            fi = 1.0 - (a["ain"] @ k) / a["din"]
            both = fo * fi
            params = a["p_const"] + a["p_both"] @ both + a["p_out"] @ fo
            macs = a["m_const"] + a["m_both"] @ both + a["m_out"] @ fo
            return int(np.rint(params)), int(np.rint(macs))
        if self.method == "blocks":
            gone = r >= BLOCK_REMOVED
            return (
                self.params_before - int(a["params"][gone].sum()),
                self.macs_before - int(a["macs"][gone].sum()),
            )
        size = a["size"]
        if self.method == "nm":
            zeroed = size / NM_GROUP * np.round(np.clip(r, 0.0, 1.0) * NM_GROUP)
        else:
            zeroed = np.clip(np.floor(size * r + 1e-9), 0.0, size)
        return (
            self.params_before - int(zeroed.sum()),
            self.macs_before - int(np.rint(zeroed @ a["macs_per_weight"])),
        )

    def macs_matrix(self, rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Structured: MACs after each row of ratios (rows x targets), as :meth:`predict_vector`
        counts them, for many candidate plans at once; with ``weights`` (one per layer of
        :attr:`rows`, e.g. its measured ms per MAC) each layer's MACs count that much."""
        if self.method != "structured":
            raise StudioError("MACs of many plans at once are known for structured plans only")
        a = self._arrays
        w = np.ones(len(self.rows)) if weights is None else weights
        k = a["unit"] * np.clip(np.floor(a["n"] * rows + 1e-9), 0.0, a["n"] - 1)
        fo = 1.0 - (k @ a["aout"].T) / a["dout"]
        fi = 1.0 - (k @ a["ain"].T) / a["din"]
        return a["m_const"] + (fo * fi) @ (w * a["m_both"]) + fo @ (w * a["m_out"])

    def layer_macs(self) -> np.ndarray:
        """Structured: the unpruned MACs of each layer of :attr:`rows`."""
        return self._arrays["m_both"] + self._arrays["m_out"]

    def channels_vector(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Structured: output and input channels (or features) each of :attr:`rows` keeps
        after ratios ``r`` in target order, as :meth:`predict_vector` counts them."""
        if self.method != "structured":
            raise StudioError("channel counts after a plan are known for structured plans only")
        a = self._arrays
        k = a["unit"] * np.clip(np.floor(a["n"] * r + 1e-9), 0.0, a["n"] - 1)
        return a["dout"] - a["aout"] @ k, a["din"] - a["ain"] @ k

    def unit_sizes(self) -> np.ndarray:
        """Structured: channels removed per step of each target (1, or a head's share of a
        fused attention projection)."""
        if self.method != "structured":
            return np.ones(len(self.names))
        return self._arrays["unit"].copy()

    def steps(self) -> np.ndarray:
        """How many distinct counts each target's ratio selects among: channels (per attention
        head and q/k/v part for fused projections), weights, or 1 for a block."""
        a = self._arrays
        if self.method == "structured":
            return a["n"].copy()
        if self.method == "blocks":
            return np.ones(len(self.names))
        return a["size"].copy()

    def fractions(self, ratios: Mapping[str, float]) -> tuple[float, float]:
        """(parameters, MACs) after pruning as fractions of the original."""
        params, macs = self.predict(ratios)
        return params / max(1, self.params_before), macs / max(1, self.macs_before)


# ---- structured: per-layer fractions of kept output and input channels ----------------------


def _own_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters(recurse=False))


def _structured(cost: CostModel, module: nn.Module, x: torch.Tensor, macs: dict[str, int]) -> None:
    outputs = graph.output_layers(module, x)
    dg, groups = graph.traced_groups(module, x, ignored=outputs)
    mods = dict(module.named_modules())
    names: dict[object, str] = {m: n for n, m in mods.items()}
    for name, mod in mods.items():  # parameters held directly by a module count as it
        for param in mod.parameters(recurse=False):
            names.setdefault(param, name)
    # channels each group removes from each layer's output / input, per root channel
    out_of: dict[str, dict[int, float]] = {}
    in_of: dict[str, dict[int, float]] = {}
    dims: dict[tuple[str, bool], int] = {}  # (layer, output side) -> idx count in its group
    units, bases = [], []
    for g, (info, group) in enumerate(groups):
        seen: dict[tuple[str, bool], int] = {}
        for dep, idxs in group:
            name = names.get(dep.target.module)
            if name is None or not _own_params(mods[name]):
                continue
            key = (name, bool(dg.is_out_channel_pruning_fn(dep.handler)))
            seen[key] = max(seen.get(key, 0), len(idxs))
        for (name, out), count in seen.items():
            if not out and (name, True) in seen:
                continue  # depthwise convs and norms lose input and output channels together
            (out_of if out else in_of).setdefault(name, {})[g] = count / info.channels
            dims.setdefault((name, out), count)
        layout = graph.head_layout(module, info.root)
        unit = layout[0] * layout[1] if layout else 1
        units.append(unit)
        bases.append(info.channels // unit)
        params = sum(_own_params(mods[n]) for n in info.layers)
        layer_macs = sum(macs.get(n, 0) for n in info.layers)
        cost.targets.append(PlanTarget(info.root, info.layers, info.channels, params, layer_macs))
        cost.groups[info.root] = group
    cost.names = [t.name for t in cost.targets]
    # attention's own matrix products shrink with its q/k/v projection
    for name, mod in mods.items():
        qkv = f"{name}.qkv" if name else "qkv"
        if macs.get(name) and not _own_params(mod) and qkv in out_of and name not in out_of:
            out_of[name] = out_of[qkv]
            dims[(name, True)] = getattr(mods[qkv], "out_features", 0)
    rows = [n for n in mods if n in out_of or n in in_of]
    cost.rows = rows
    n_groups = len(groups)
    a = {k: np.zeros(len(rows)) for k in ("dout", "din", "p_both", "p_out", "m_both", "m_out")}
    a["aout"], a["ain"] = np.zeros((len(rows), n_groups)), np.zeros((len(rows), n_groups))
    for i, name in enumerate(rows):
        mod = mods[name]
        for g, per_channel in out_of.get(name, {}).items():
            a["aout"][i, g] = per_channel
        for g, per_channel in in_of.get(name, {}).items():
            a["ain"][i, g] = per_channel
        d_out, d_in = _channel_dims(mod)
        a["dout"][i] = d_out or dims.get((name, True), 1)
        a["din"][i] = d_in or dims.get((name, False), 1)
        own, own_macs = _own_params(mod), macs.get(name, 0)
        if isinstance(mod, graph.ROOT_TYPES) and not _depthwise(mod):
            weight = mod.weight.numel()
            a["p_both"][i], a["p_out"][i], a["m_both"][i] = weight, own - weight, own_macs
        elif isinstance(mod, graph.ROOT_TYPES):
            a["p_out"][i], a["m_out"][i] = own, own_macs
        else:
            a["p_both"][i], a["m_both"][i] = own, own_macs
    listed = set(rows)
    a["p_const"] = np.float64(sum(_own_params(m) for n, m in mods.items() if n not in listed))
    a["m_const"] = np.float64(sum(v for n, v in macs.items() if n not in listed))
    a["unit"], a["n"] = np.array(units, float), np.array(bases, float)
    cost._arrays = a


def _channel_dims(mod: nn.Module) -> tuple[int, int]:
    """(output, input) channels of a conv or linear; (0, 0) for other layers."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    if isinstance(mod, graph.ROOT_TYPES):
        return int(mod.out_channels), int(mod.in_channels)  # type: ignore[arg-type]
    return 0, 0


def _depthwise(mod: nn.Module) -> bool:
    groups = getattr(mod, "groups", 1)
    return isinstance(groups, int) and groups > 1 and groups == getattr(mod, "in_channels", 0)


# ---- unstructured and N:M: one target per weight tensor -------------------------------------


def _weights(cost: CostModel, module: nn.Module, x: torch.Tensor, macs: dict[str, int]) -> None:
    sizes, per_weight = [], []
    for name, mod in module.named_modules():
        if not isinstance(mod, MASKABLE) or mod.weight.dim() < 2:
            continue
        if cost.method == "nm" and nm_view(mod.weight) is None:
            continue  # fewer than 4 input weights per row, or not a multiple of 4
        size = mod.weight.numel()
        layer_macs = macs.get(name, 0)
        cost.targets.append(PlanTarget(name, (name,), size, _own_params(mod), layer_macs))
        sizes.append(size)
        per_weight.append(layer_macs / size)
    cost.names = [t.name for t in cost.targets]
    cost._arrays = {"size": np.array(sizes, float), "macs_per_weight": np.array(per_weight)}


# ---- blocks: residual blocks replaced by their shortcut ------------------------------------


def _blocks(cost: CostModel, module: nn.Module, x: torch.Tensor, macs: dict[str, int]) -> None:
    """The engine's removable blocks (:func:`studio.core.models.blocks.find_blocks`); removing
    one takes away every layer its shortcut does not use, with their parameters and MACs."""
    import copy

    from studio.core.models.blocks import find_blocks, shortcut_graph

    mods = dict(module.named_modules())
    params, block_macs = [], []
    for block in find_blocks(copy.deepcopy(module).eval(), x):  # it swaps blocks in and out
        name = block.name
        shortcut = shortcut_graph(mods[name])
        kept = {f"{name}.{n}" for n, _ in shortcut.named_modules() if n} if shortcut else set()
        inside = [n for n in mods if n == name or n.startswith(name + ".")]
        gone = [n for n in inside if n not in kept]
        m = sum(macs.get(n, 0) for n in gone)
        layers = tuple(n for n in gone if _own_params(mods[n]))
        cost.targets.append(PlanTarget(name, layers, 1, block.params, m))
        params.append(block.params)
        block_macs.append(m)
    cost.names = [t.name for t in cost.targets]
    cost._arrays = {"params": np.array(params, np.int64), "macs": np.array(block_macs, np.int64)}
