"""Layer inventory: every layer's type, output shape, parameters, MACs, sparsity and group.

MACs are counted for one input of the model's input shape: convolutions, linear layers and
matrix products by torch's FLOP formulas (FLOPs / 2), attributed to the innermost module
that performed them; normalisation layers as one MAC per output element; recurrent layers
by their gate equations. Layer MACs add up to the model's total by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import graph
from studio.core.models.loaded import EAGER, HUGGINGFACE, ONNX, LoadedModel

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
RNN_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    macs: int
    sparsity: float  # fraction of exact zeros in the layer's weights
    prunable: bool
    group: int | None  # index into Inventory.groups
    reason: str  # why the layer is not prunable; "" when it is


@dataclass(frozen=True)
class Inventory:
    model_name: str
    kind: str
    input_shape: tuple[int, ...]
    params: int
    macs: int
    layers: list[LayerInfo]
    groups: list[graph.DependencyGroup] = field(default_factory=list)
    graph_error: str | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all parameters."""
        zeros = sum(layer.sparsity * layer.params for layer in self.layers)
        return zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sparsity"] = self.sparsity
        data["groups"] = [asdict(g) for g in self.groups]
        return data


def transformer_groups(module: nn.Module) -> list[graph.DependencyGroup]:
    """A transformer's structured groups, per layer: its head groups (``channels`` = key/value
    heads; members = the q/k/v projections, consumer = the out projection) and its MLP neurons
    (members = the up/gate projections, consumer = the down projection)."""
    from studio.core.models import hf_arch

    hf = getattr(module, "hf", module)
    named = dict(hf.named_modules())

    def projections(prefix: str, skip: str) -> tuple[str, ...]:
        return tuple(
            "hf." + n
            for n, m in named.items()
            if n.startswith(prefix + ".") and n != skip and type(m).__name__ in ("Linear", "Conv1D")
        )

    groups = []
    for b in hf_arch.blocks(hf):
        groups.append(
            graph.DependencyGroup(
                "hf." + b.attention,
                b.kv_heads,
                projections(b.attention, b.out_proj),
                ("hf." + b.out_proj,),
            )  # fmt: skip
        )
        groups.append(
            graph.DependencyGroup(
                "hf." + b.mlp,
                b.intermediate,
                projections(b.mlp, b.mlp_down),
                ("hf." + b.mlp_down,),
            )  # fmt: skip
        )
    return groups


def build_inventory(
    model: LoadedModel, progress: ProgressFn | None = None, cancel: CancelToken | None = None
) -> Inventory:
    """Inspect ``model`` with one forward pass and Torch-Pruning's dependency graph."""
    module = model.module
    x = model.example_input()
    report(progress, 0.05, "counting parameters and MACs")
    shapes, macs = trace_layers(module, x)
    check(cancel)
    report(progress, 0.4, "building the dependency graph")
    groups: list[graph.DependencyGroup] = []
    left_whole: dict[str, str] = {}  # group roots the graph cannot prune safely, with the reason
    graph_error: str | None = None
    if model.kind == HUGGINGFACE:
        groups = transformer_groups(module)
    elif model.kind in (EAGER, ONNX):
        try:
            outputs = graph.output_layers(module, x)
            tp_graph, traced = graph.traced_groups(module, x, ignored=outputs)
            groups = [info for info, _ in traced]
            left_whole = dict(graph.left_whole(tp_graph))
        except StudioError as exc:
            graph_error = str(exc)
    else:
        graph_error = model.unsupported.get("structural pruning", "not supported")
    check(cancel)
    report(progress, 0.9, "assembling the inventory")
    # a layer's group is the one that removes its output channels; layers that only lose
    # input channels (a classifier after the last conv) show the group they consume
    group_of = {name: i for i, g in enumerate(groups) for name in g.consumers}
    group_of.update({name: i for i, g in enumerate(groups) for name in g.members})
    layers = []
    for name, mod in layer_rows(module, macs):
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        gid = group_of.get(name)
        reason = "" if gid is not None else _reason(name, mod, params, graph_error)
        if gid is None and name in left_whole:
            reason = left_whole[name]
        layers.append(
            LayerInfo(
                name=name or "(model)",
                type=type(mod).__name__,
                output_shape=shapes.get(name),
                params=params,
                macs=macs.get(name, 0),
                sparsity=_sparsity(mod),
                prunable=gid is not None,
                group=gid,
                reason=reason,
            )
        )
    total_params = sum(p.numel() for p in module.parameters())
    report(progress, 1.0, "done")
    return Inventory(
        model.name,
        model.kind,
        tuple(model.input_shape),
        total_params,
        sum(layer.macs for layer in layers),
        layers,
        groups,
        graph_error,
    )


def layer_rows(module: nn.Module, macs: dict[str, int]) -> list[tuple[str, nn.Module]]:
    """Leaf modules, plus any module that holds parameters or MACs of its own."""
    rows = []
    for name, mod in module.named_modules():
        leaf = next(iter(mod.children()), None) is None
        own_params = next(iter(mod.parameters(recurse=False)), None) is not None
        if (leaf and name) or own_params or macs.get(name, 0) > 0:
            rows.append((name, mod))
    return rows


class _MacCounter(TorchDispatchMode):
    """FLOPs of matrix products (torch's own formulas), attributed to the innermost module
    running. Unlike FlopCounterMode it installs no process-wide module hooks: the dispatch
    mode is thread-local and the module hooks are on the traced module only, so forward
    passes of other models in other threads neither disturb nor are counted in the count."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = [""]
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            name = self.stack[-1]
            self.flops[name] = self.flops.get(name, 0) + int(formula(*args, **kwargs, out_val=out))
        return out


def trace_layers(
    module: nn.Module,
    x: torch.Tensor,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Output shape and own MACs of every module, from one forward pass; with
    ``input_shapes``, the shape of each module's first input is put there too."""
    names = {m: n for n, m in module.named_modules()}
    shapes: dict[str, tuple[int, ...]] = {}
    extra: dict[str, int] = {}
    counter = _MacCounter()

    def enter(mod: nn.Module, _inputs: tuple) -> None:
        counter.stack.append(names[mod])

    def hook(mod: nn.Module, inputs: tuple, out: object) -> None:
        name = names[mod]
        if len(counter.stack) > 1:
            counter.stack.pop()
        tensor = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(tensor, torch.Tensor):
            shapes.setdefault(name, tuple(tensor.shape))
            if input_shapes is not None and inputs and isinstance(inputs[0], torch.Tensor):
                input_shapes.setdefault(name, tuple(inputs[0].shape))
            if isinstance(mod, NORM_TYPES):
                extra[name] = extra.get(name, 0) + tensor.numel()
            elif type(mod) in RNN_GATES and inputs and isinstance(inputs[0], torch.Tensor):
                extra[name] = extra.get(name, 0) + _rnn_macs(mod, inputs[0])

    handles = []
    if not isinstance(module, torch.jit.ScriptModule):  # scripted: all MACs are the model's
        for m in module.modules():
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(hook)]
    try:
        with torch.no_grad(), counter:
            module(x)
    except Exception as exc:
        raise StudioError(
            f"the model does not run on an input of shape {tuple(x.shape)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        ) from None
    finally:
        for h in handles:
            h.remove()
    own = {name: flops // 2 for name, flops in counter.flops.items()}
    for name, value in extra.items():
        own[name] = own.get(name, 0) + value
    return shapes, {n: v for n, v in own.items() if v > 0}


def _rnn_macs(mod: nn.Module, x: torch.Tensor) -> int:
    gates = RNN_GATES[type(mod)]
    steps = x.shape[1] if getattr(mod, "batch_first", False) else x.shape[0]
    batch = x.shape[0] if getattr(mod, "batch_first", False) else (x.shape[1] if x.dim() > 2 else 1)
    dirs = 2 if mod.bidirectional else 1
    total, in_size = 0, mod.input_size
    for _layer in range(mod.num_layers):
        total += dirs * gates * mod.hidden_size * (in_size + mod.hidden_size) * steps * batch
        in_size = mod.hidden_size * dirs
    return total


def _sparsity(mod: nn.Module) -> float:
    weight = getattr(mod, "weight", None)
    tensors = [weight] if isinstance(weight, torch.Tensor) else list(mod.parameters(recurse=False))
    n = sum(t.numel() for t in tensors)
    return float(sum(int((t == 0).sum()) for t in tensors)) / n if n else 0.0


def _reason(name: str, mod: nn.Module, params: int, graph_error: str | None) -> str:
    if params == 0:
        return "no weights"
    if graph_error:
        return graph_error
    if type(mod) in graph.UNPRUNABLE:
        return graph.UNPRUNABLE[type(mod)]
    if isinstance(mod, graph.ROOT_TYPES):
        return "output layer: its outputs are the model's outputs"
    return "not coupled to any prunable layer's channels"
