"""Dependency groups from Torch-Pruning: which layers must be pruned together.

A group is rooted at a layer whose output channels can be removed; it lists every layer
whose weights change with it (its batch norm, the next layers' inputs, the other side of a
residual add). We wrap Torch-Pruning so that its failures become one clear message.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from studio.core.errors import StudioError, first_line

ROOT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose2d,
    nn.Linear,
)
# Layers Torch-Pruning traces but cannot prune: groups touching them are left out.
# (Torch-Pruning 1.6.1's LSTM pruner asserts num_layers == 1 and then mis-indexes the gates.)
UNPRUNABLE: dict[type[nn.Module], str] = {
    nn.LSTM: "recurrent hidden units cannot be removed structurally yet "
    "(Torch-Pruning's LSTM pruner is broken); prune its weights unstructured",
    nn.GRU: "recurrent hidden units cannot be removed structurally; prune its weights unstructured",
    nn.RNN: "recurrent hidden units cannot be removed structurally; prune its weights unstructured",
}


@dataclass(frozen=True)
class DependencyGroup:
    """Layers coupled through one set of channels, rooted at ``root``."""

    root: str
    channels: int
    members: tuple[str, ...]  # layers whose output channels are removed, root first
    consumers: tuple[str, ...] = ()  # layers that only lose the matching input channels

    @property
    def layers(self) -> tuple[str, ...]:
        return self.members + self.consumers


def output_layers(module: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """Layers whose output channels are the model's output channels (its classes, a
    detector's box bins): those that reach an output through parameter-free operations only
    (reshape, concat, split, sigmoid, softmax, norms...), with no other layer in between.

    Found on the autograd graph of one forward pass, walked back from the outputs without
    recursion (a deep model's graph is long).
    """
    produced: dict[object, nn.Module] = {}

    def hook(mod: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            produced[out.grad_fn] = mod

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, ROOT_TYPES)]
    try:
        with torch.enable_grad():
            out = module(example_input)
    finally:
        for h in handles:
            h.remove()
    outs = out if isinstance(out, (tuple, list)) else [out]
    found: list[nn.Module] = []
    stack = [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen: set[object] = set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        layer = produced.get(fn)
        if layer is not None:
            if layer not in found:
                found.append(layer)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return found


BROKEN_ATTRIBUTE = "studio_unmapped"  # on a graph: {op node: why its channels are not mapped}


def _tolerant_index_mapping() -> None:
    """Make Torch-Pruning's index-mapping pass survive an operation it cannot map.

    Torch-Pruning maps channel indices through concat, split, reshape and slice nodes in one
    pass; one node it cannot map (a split whose outputs it mis-orders, a reshape of unknown
    size) ends the whole graph with an IndexError. Patched once: each node is mapped on its
    own, and a node that fails is recorded on the graph; :func:`traced_groups` then leaves the
    groups that pass through it whole, and the rest of the model is still pruned.
    """
    from torch_pruning import ops
    from torch_pruning.dependency import index_mapping

    if getattr(index_mapping.update_index_mapping, "studio_tolerant", False):
        return
    updates = {
        ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
        ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
        ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
        ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
        ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
        ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
    }

    def update_index_mapping(tp_graph: Any) -> None:
        broken = getattr(tp_graph, BROKEN_ATTRIBUTE, None)
        if broken is None:
            broken = {}
            setattr(tp_graph, BROKEN_ATTRIBUTE, broken)
        for node in list(tp_graph.module2node.values()):
            update = updates.get(node.type)
            if update is None:
                continue
            try:
                update(tp_graph, node)
            except Exception as exc:  # Torch-Pruning's mapping raises bare errors
                broken[node] = f"{node.type.name.lower()} ({type(exc).__name__}: {first_line(exc)})"

    update_index_mapping.studio_tolerant = True  # type: ignore[attr-defined]
    index_mapping.update_index_mapping = update_index_mapping


def build_graph(module: nn.Module, example_input: torch.Tensor):  # -> tp.DependencyGraph
    """Trace ``module`` into Torch-Pruning's dependency graph, or raise StudioError."""
    import torch_pruning as tp

    _tolerant_index_mapping()
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(
                module, example_inputs=example_input, verbose=False
            )
    except Exception as exc:  # Torch-Pruning raises bare exceptions of many kinds
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StudioError(
            f"the dependency graph could not be built: {type(exc).__name__}: {first}"[:300]
        ) from None


GRAPH_BUDGET_S = 45.0  # building the graph and its groups; with the rest, `info` is < 60 s


def traced_groups(
    module: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module] | None = None
) -> tuple[Any, list[tuple[DependencyGroup, Any]]]:
    """The dependency graph and each prunable group with its Torch-Pruning group object
    (which prunes all its layers at once: ``graph.get_pruning_group(root, handler, idxs)``).

    Torch-Pruning's analysis of some graphs takes very long (its channel inference recurses
    through every path); past ``GRAPH_BUDGET_S`` this refuses in one line instead of hanging.
    The analysis runs on a daemon thread, which is left to finish on its own (it only reads
    the module once its trace is done; the CLI and the window's jobs run in their own
    process, which ends with the command or job).
    """
    result: list[Any] = []

    def work() -> None:
        try:
            result.append(_traced_groups(module, example_input, ignored))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=work, name="dependency-graph", daemon=True)
    thread.start()
    thread.join(GRAPH_BUDGET_S)
    if not result:
        raise StudioError(
            f"the dependency graph took longer than {GRAPH_BUDGET_S:.0f} s to build, so the "
            "model cannot be pruned structurally (unstructured and N:M pruning still work)"
        )
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _traced_groups(
    module: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module] | None = None
) -> tuple[Any, list[tuple[DependencyGroup, Any]]]:
    mark_attention_heads(module, example_input)
    graph = build_graph(module, example_input)
    names: dict[object, str] = {m: n for n, m in module.named_modules()}
    # parameters held directly by a module (a ViT's class token) count as that module
    for mod_name, mod in module.named_modules():
        for param in mod.parameters(recurse=False):
            names.setdefault(param, mod_name)
    mod_of = dict(module.named_modules())
    order = {name: i for i, name in enumerate(mod_of)}
    groups = []
    left_whole: list[tuple[str, str]] = []
    setattr(graph, LEFT_WHOLE_ATTRIBUTE, left_whole)
    try:
        for group in graph.get_all_groups(
            ignored_layers=ignored or [], root_module_types=ROOT_TYPES
        ):
            members: list[str] = []
            consumers: list[str] = []
            for dep, _idxs in group:
                name = names.get(dep.target.module)
                if name is None or not _has_params(mod_of[name]):
                    continue
                if graph.is_out_channel_pruning_fn(dep.handler):
                    if name not in members:
                        members.append(name)
                elif name not in consumers:
                    consumers.append(name)
            consumers = [c for c in consumers if c not in members]
            if any(type(mod_of[n]) in UNPRUNABLE for n in members + consumers):
                continue
            root = group[0].dep.target.module
            problem = _group_problem(graph, group, names)
            if problem:
                left_whole.append((names.get(root, "?"), problem))
                continue
            pruner = graph.get_pruner_of_module(root)
            channels = int(pruner.get_out_channels(root) or 0)
            root_name = names.get(root, "?")
            info = DependencyGroup(
                root_name,
                channels,
                (root_name, *sorted((m for m in members if m != root_name), key=order.get)),
                tuple(sorted(consumers, key=order.get)),
            )
            groups.append((info, group))
    except Exception as exc:
        raise StudioError(
            f"the dependency groups could not be listed: {type(exc).__name__}: {exc}"[:300]
        ) from None
    groups.sort(key=lambda item: order.get(item[0].root, len(order)))
    return graph, groups


LEFT_WHOLE_ATTRIBUTE = "studio_left_whole"  # on a graph: [(root, why its group is left whole)]


def left_whole(tp_graph: Any) -> list[tuple[str, str]]:
    """Groups :func:`traced_groups` left out of ``tp_graph``'s groups, with the reason."""
    return list(getattr(tp_graph, LEFT_WHOLE_ATTRIBUTE, []))


def _group_problem(tp_graph: Any, group: Any, names: dict[object, str]) -> str:
    """Why a group cannot be pruned safely ('' if it can): it passes through an operation
    whose channels were not mapped, or it maps channels past a layer's width."""
    broken = getattr(tp_graph, BROKEN_ATTRIBUTE, {})
    for dep, idxs in group:
        for node in (dep.source, dep.target):
            if node in broken:
                return f"left whole: the channels cannot be followed through {broken[node]}"
        module = dep.target.module
        if not isinstance(module, nn.Module) or not idxs:
            continue
        pruner = tp_graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        out = tp_graph.is_out_channel_pruning_fn(dep.handler)
        try:
            width = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
        except Exception:  # a pruner that cannot tell: nothing to check against
            continue
        top = max(int(getattr(i, "idx", i)) for i in idxs)
        if width and top >= width:
            side = "output" if out else "input"
            return (
                f"left whole: the dependency graph maps its channels past the {width} {side} "
                f"channels of {names.get(module, type(module).__name__)} (index {top})"
            )
    return ""


def _has_params(module: object) -> bool:
    return isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))


HEADS_ATTRIBUTE = "studio_heads"


def mark_attention_heads(module: nn.Module, example_input: torch.Tensor) -> int:
    """Find linear layers whose output is split into attention heads, and note the number of
    heads on the layer (attribute ``studio_heads``); returns how many were marked.

    A projection feeding ``reshape(..., heads, head_dim)`` (separate q, k and v layers, as
    torch.onnx writes them and as many hand-written attentions are) must lose the same number
    of dimensions in every head, or the head boundaries shift. One forward pass: a layer's
    output tensor that some module turns into one more dimension whose last two multiply to
    the layer's width is split into heads (seen by a torch function mode, so that
    ``x.view(b, n, heads, -1)`` in an eager model counts as a reshape module does).
    """
    from torch.overrides import TorchFunctionMode

    # the outputs are kept (not only their ids, which freed tensors hand on)
    produced: dict[int, tuple[nn.Linear, torch.Tensor]] = {}
    heads: dict[nn.Linear, int] = {}

    def hook(mod: nn.Module, _inputs: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (mod, out)

    def split(first: object, out: object) -> None:
        if not isinstance(first, torch.Tensor) or produced.get(id(first), (0, 0))[1] is not first:
            return
        if not isinstance(out, torch.Tensor) or first.dim() < 2 or out.dim() != first.dim() + 1:
            return
        if out.shape[:-2] == first.shape[:-1] and out.shape[-2] * out.shape[-1] == first.shape[-1]:
            if 1 < out.shape[-2] < first.shape[-1]:
                heads[produced[id(first)][0]] = int(out.shape[-2])

    class Reshapes(TorchFunctionMode):  # sees x.view / reshape / unflatten, however called
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if args:
                split(args[0], out)
            return out

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad(), Reshapes():
            module(example_input)
    except Exception:  # a model that does not run is reported by its caller
        return 0
    finally:
        for h in handles:
            h.remove()
    for layer, count in heads.items():
        setattr(layer, HEADS_ATTRIBUTE, count)
    return len(heads)


def head_layout(module: nn.Module, name: str) -> tuple[int, int] | None:
    """(parts, heads) if the group rooted at ``name`` is an attention projection whose output
    channels must go equally in every head: (3, heads) for a fused q/k/v layer, (1, heads) for
    a projection marked by :func:`mark_attention_heads`; None otherwise."""
    fused = fused_qkv_heads(module, name)
    if fused:
        return 3, fused
    layer = dict(module.named_modules()).get(name)
    heads = getattr(layer, HEADS_ATTRIBUTE, None)
    if isinstance(layer, nn.Linear) and isinstance(heads, int) and heads > 1:
        if layer.out_features % heads == 0:
            return 1, heads
    return None


def fused_qkv_heads(module: nn.Module, name: str) -> int | None:
    """Number of heads if ``name`` is a fused q/k/v projection (timm layout), else None.

    Its output channels must be removed the same way in q, k and v and equally in every
    head, or the attention reshape breaks; see :func:`qkv_channels`.
    """
    mods = dict(module.named_modules())
    layer = mods.get(name)
    parent = mods.get(name.rsplit(".", 1)[0] if "." in name else "")
    heads = getattr(parent, "num_heads", None)
    if not isinstance(layer, nn.Linear) or not isinstance(heads, int) or heads <= 0:
        return None
    if layer.out_features % (3 * heads) or getattr(parent, "qkv", None) is not layer:
        return None
    return heads


def qkv_channels(scores: list[float] | Any, heads: int, per_head: int, parts: int = 3) -> list[int]:
    """The ``per_head`` weakest head dimensions of every head, as output channels of a
    projection holding ``parts`` (3: fused q/k/v; 1: one of separate projections)."""
    import numpy as np

    s = np.asarray(scores, dtype=float)
    dim = s.size // parts
    head_dim = dim // heads
    joint = s.reshape(parts, heads, head_dim).sum(0)  # a dimension goes from q, k and v
    chosen = np.argsort(joint, axis=1, kind="stable")[:, :per_head]
    return sorted(
        int(part * dim + h * head_dim + d)
        for part in range(parts)
        for h in range(heads)
        for d in chosen[h]
    )
