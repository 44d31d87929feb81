"""Whole-block removal: a residual block replaced by its shortcut.

A residual block is found generically: a module whose own ``forward`` (traced with torch.fx,
its children kept as calls) adds two values computed from its input, one of them through a
much lighter path (the input itself, or a 1x1 downsample) than the other (the branch). Removing
the block rewrites its graph so every such add returns the shortcut, and drops what only the
branch used: a ResNet basic block becomes ``relu(shortcut(x))``, a transformer block the
identity. Only blocks whose removal keeps the model running with the same output are offered.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from studio.core.errors import StudioError

_ADDS = (operator.add, operator.iadd, torch.add)
MARKER = "studio_removed_block"  # in the ``meta`` of the graph module that replaced a block


@dataclass(frozen=True)
class BlockTarget:
    """A removable residual block: its name and the parameters its branch holds."""

    name: str
    params: int  # parameters that go away with the branch


class _ChildrenAsCalls(fx.Tracer):
    """Trace one module's own forward: every child stays a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def shortcut_graph(block: nn.Module) -> fx.GraphModule | None:
    """``block`` with each residual add replaced by its shortcut, or None if it has none."""
    if isinstance(block, fx.GraphModule) or not any(True for _ in block.children()):
        return None
    try:
        graph = _ChildrenAsCalls().trace(block)
    except Exception:  # data-dependent control flow, tuple unpacking of shapes, ...
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    mods = dict(block.named_modules())
    ancestors: dict[fx.Node, set[fx.Node]] = {}
    for node in graph.nodes:
        seen: set[fx.Node] = {node}
        for arg in node.all_input_nodes:
            seen |= ancestors[arg]
        ancestors[node] = seen

    def cost(nodes: set[fx.Node]) -> int:
        return sum(
            sum(p.numel() for p in mods[str(n.target)].parameters())
            for n in nodes
            if n.op == "call_module"
        )

    changed = False
    for node in list(graph.nodes):
        is_add = (node.op == "call_function" and node.target in _ADDS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if not is_add or len(args) != 2 or not all(inputs[0] in ancestors[a] for a in args):
            continue
        a, b = args
        cost_a, cost_b = cost(ancestors[a] - ancestors[b]), cost(ancestors[b] - ancestors[a])
        if cost_a == cost_b:
            continue  # two equal paths: not a shortcut and a branch
        node.replace_all_uses_with(a if cost_a < cost_b else b)
        graph.erase_node(node)
        changed = True
    if not changed:
        return None
    module = fx.GraphModule(block, graph, class_name=f"{type(block).__name__}Shortcut")
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()  # the branch's layers and their weights go
    module.recompile()
    module.meta[MARKER] = True  # GraphModule keeps ``meta`` through deepcopy
    return module


def remove_block(module: nn.Module, name: str) -> nn.Module:
    """Replace block ``name`` of ``module`` by its shortcut, in place; returns the old block."""
    mods = dict(module.named_modules())
    block = mods.get(name)
    if block is None or not name:
        raise StudioError(f"the model has no block named {name!r}")
    replacement = shortcut_graph(block)
    if replacement is None:
        raise StudioError(f"{name} is not a residual block (no add of a shortcut and a branch)")
    set_child(module, name, replacement)
    return block


def set_child(module: nn.Module, name: str, child: nn.Module) -> None:
    """Put ``child`` at dotted path ``name`` of ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, child)


def removed_blocks(module: nn.Module) -> list[str]:
    """Names of the blocks of ``module`` that were replaced by their shortcut."""
    return [n for n, m in module.named_modules() if n and getattr(m, "meta", {}).get(MARKER)]


def find_blocks(module: nn.Module, example_input: torch.Tensor) -> list[BlockTarget]:
    """Residual blocks of ``module`` whose removal keeps it running with the same output shape.

    Each candidate is removed and put back in place; ``module`` ends as it started.
    """
    with torch.no_grad():
        reference = output_shape(module(example_input))
    found = []
    for name, block in list(module.named_modules()):
        if not name:
            continue
        replacement = shortcut_graph(block)
        if replacement is None:
            continue
        kept = {id(p) for p in replacement.parameters()}
        params = sum(p.numel() for p in block.parameters() if id(p) not in kept)
        set_child(module, name, replacement)
        try:
            with torch.no_grad():
                runs = output_shape(module(example_input)) == reference
        except Exception:  # the shortcut does not fit where the block was
            runs = False
        finally:
            set_child(module, name, block)
        if runs and params > 0:
            found.append(BlockTarget(name, params))
    return found


def branch_scores(
    module: nn.Module, blocks: list[BlockTarget], x: torch.Tensor
) -> dict[str, float]:
    """How much each block changes its input: ||block(x) - shortcut(x)|| / ||shortcut(x)||
    on ``x``. Small values mark blocks whose removal changes the model least."""
    mods = dict(module.named_modules())
    shortcuts = {b.name: shortcut_graph(mods[b.name]) for b in blocks}
    scores: dict[str, float] = {}
    handles = []

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, out: object) -> None:
            with torch.no_grad():
                short = shortcuts[name](*inputs)  # type: ignore[misc]
            if isinstance(out, torch.Tensor) and isinstance(short, torch.Tensor):
                delta = float((out - short).norm())
                scores[name] = delta / max(float(short.norm()), 1e-12)

        return record

    for block in blocks:
        handles.append(mods[block.name].register_forward_hook(hook(block.name)))
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return scores


def output_shape(out: object) -> object:
    """Shapes of a model's output (a tensor or nested tuples of them), to compare."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(output_shape(o) for o in out)
    return type(out).__name__
