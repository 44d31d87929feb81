"""Dependency groups from Torch-Pruning: which layers must be pruned together.

A group is rooted at a layer whose output channels can be removed; it lists every layer
whose weights change with it (its batch norm, the next layers' inputs, the other side of a
residual add). We wrap Torch-Pruning so that its failures become one clear message.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from studio.core.errors import StudioError

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
    """Layers whose output is the model's output (their output channels are the classes)."""
    produced: dict[int, nn.Module] = {}

    def hook(mod: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = mod

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, ROOT_TYPES)]
    try:
        with torch.no_grad():
            out = module(example_input)
    finally:
        for h in handles:
            h.remove()
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [produced[id(o)] for o in outs if isinstance(o, torch.Tensor) and id(o) in produced]


def build_graph(module: nn.Module, example_input: torch.Tensor):  # -> tp.DependencyGraph
    """Trace ``module`` into Torch-Pruning's dependency graph, or raise StudioError."""
    import torch_pruning as tp

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


def dependency_groups(
    module: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module] | None = None
) -> list[DependencyGroup]:
    """All prunable groups of ``module`` (``ignored`` layers' outputs are never pruned)."""
    return [g for g, _ in traced_groups(module, example_input, ignored)[1]]


def traced_groups(
    module: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module] | None = None
) -> tuple[Any, list[tuple[DependencyGroup, Any]]]:
    """The dependency graph and each prunable group with its Torch-Pruning group object
    (which prunes all its layers at once: ``graph.get_pruning_group(root, handler, idxs)``)."""
    graph = build_graph(module, example_input)
    names: dict[object, str] = {m: n for n, m in module.named_modules()}
    # parameters held directly by a module (a ViT's class token) count as that module
    for mod_name, mod in module.named_modules():
        for param in mod.parameters(recurse=False):
            names.setdefault(param, mod_name)
    mod_of = dict(module.named_modules())
    order = {name: i for i, name in enumerate(mod_of)}
    groups = []
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


def _has_params(module: object) -> bool:
    return isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))


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


def qkv_channels(scores: list[float] | Any, heads: int, per_head: int) -> list[int]:
    """The ``per_head`` weakest head dimensions of every head, as q/k/v output channels."""
    import numpy as np

    s = np.asarray(scores, dtype=float)
    dim = s.size // 3
    head_dim = dim // heads
    joint = s.reshape(3, heads, head_dim).sum(0)  # a dimension is kept or removed in q, k, v
    chosen = np.argsort(joint, axis=1, kind="stable")[:, :per_head]
    return sorted(
        int(part * dim + h * head_dim + d)
        for part in range(3)
        for h in range(heads)
        for d in chosen[h]
    )
