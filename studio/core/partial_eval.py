"""Re-running only the part of a network that a change affects.

The model is traced once with torch.fx. When the weights of some layers change, only the
nodes downstream of those layers produce different values; the values that flow into that
region from upstream (the *frontier*) are computed once and reused for every variant of the
change (every pruning ratio of one layer), so that each variant costs only the downstream
part of the forward pass. Models that fx cannot trace fall back to a full forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn


class PartialRunner:
    """Forward passes that recompute only what depends on a set of changed layers."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.graph_module: fx.GraphModule | None = None
        self.trace_error: str | None = None
        try:
            self.graph_module = (
                module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
            )
        except Exception as exc:  # fx cannot trace data-dependent control flow and the like
            self.trace_error = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )

    @property
    def traced(self) -> bool:
        return self.graph_module is not None

    def region(self, layers: Iterable[str]) -> Region:
        """The nodes affected by changes to ``layers`` and the frontier feeding them."""
        if self.graph_module is None:
            return Region(self, [], [], full=True)
        names = set(layers)
        nodes = list(self.graph_module.graph.nodes)
        changed = {
            n
            for n in nodes
            if (n.op == "call_module" and _within(n.target, names))
            or (n.op == "get_attr" and _within(n.target.rsplit(".", 1)[0], names))
        }
        if not changed:
            return Region(self, [], [], full=True)
        downstream: set[fx.Node] = set()
        for node in nodes:  # nodes are in topological order
            if node in changed or any(a in downstream for a in node.all_input_nodes):
                downstream.add(node)
        frontier = [
            n for n in nodes if n not in downstream and any(u in downstream for u in n.users)
        ]
        ordered = [n for n in nodes if n in downstream]
        return Region(self, frontier, ordered, full=False)

    def node_values(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        """Values of the named nodes for input ``x``, computing only what they need."""
        assert self.graph_module is not None
        nodes = list(self.graph_module.graph.nodes)
        needed = {n for n in nodes if n.name in names}
        for node in reversed(nodes):
            if node in needed:
                needed.update(node.all_input_nodes)
        env = _run(self.graph_module, [n for n in nodes if n in needed], {}, x)
        return {n.name: v for n, v in env.items() if isinstance(n, fx.Node) and n.name in names}


class Region:
    """The frontier values for a batch, then the downstream pass from them."""

    def __init__(self, runner: PartialRunner, frontier: list, downstream: list, full: bool) -> None:
        self.runner = runner
        self.frontier = frontier
        self.downstream = downstream
        self.full = full
        self._upstream: list[fx.Node] = []
        if not full:
            needed: set[fx.Node] = set(frontier)
            nodes = list(runner.graph_module.graph.nodes)  # type: ignore[union-attr]
            for node in reversed(nodes):
                if node in needed:
                    needed.update(node.all_input_nodes)
            self._upstream = [n for n in nodes if n in needed]

    def frontier_values(self, x: torch.Tensor) -> object:
        """Values entering the region for input ``x`` (or ``x`` itself without a graph)."""
        if self.full:
            return x
        env = _run(self.runner.graph_module, self._upstream, {}, x)
        return {n: env[n] for n in self.frontier}

    @property
    def frontier_names(self) -> list[str]:
        return [n.name for n in self.frontier]

    def forward_named(self, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The output from frontier values keyed by node name (shared between replicas)."""
        if self.full:
            return self.runner.module(x)
        return self.forward({n: values[n.name] for n in self.frontier})

    def forward(self, frontier: object) -> torch.Tensor:
        """The model's output computed from stored frontier values."""
        if self.full:
            return self.runner.module(frontier)
        env = dict(frontier)  # type: ignore[call-overload]
        out = _run(self.runner.graph_module, self.downstream, env, None)
        return out["__output__"]


def _within(target: str, names: set[str]) -> bool:
    return target in names or any(target.startswith(n + ".") for n in names if n)


def _run(gm: fx.GraphModule, nodes: list, env: dict, x: torch.Tensor | None) -> dict:
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    interpreter.env = env
    placeholders = iter([x] if x is not None else [])
    interpreter.args_iter = placeholders  # consumed by placeholder nodes
    for node in nodes:
        value = interpreter.run_node(node)
        if node.op == "output":
            env["__output__"] = value
        else:
            env[node] = value
    return env
