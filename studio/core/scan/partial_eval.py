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

    def region(self, layers: Iterable[str], sliced: Iterable[str] = ()) -> Region:
        """The nodes affected by changes to ``layers`` and the frontier feeding them.

        ``sliced`` names layers whose changed output is known to be a selection of their
        unchanged output (a convolution that loses output channels): where such a layer
        reads only unchanged values, its output is computed once and then selected from.
        """
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
        selectable = set(sliced)
        reused = [
            n
            for n in ordered
            if n.op == "call_module"
            and n.target in selectable
            and not any(a in downstream for a in n.all_input_nodes)
        ]
        return Region(self, frontier, ordered, full=False, reused=reused)

    def run(self, x: torch.Tensor, names: set[str]) -> tuple[object, dict[str, torch.Tensor]]:
        """The model's output for input ``x`` and the values of the named nodes on the way."""
        assert self.graph_module is not None
        env = _run(self.graph_module, list(self.graph_module.graph.nodes), {}, x)
        values = {n.name: v for n, v in env.items() if isinstance(n, fx.Node) and n.name in names}
        return env["__output__"], values

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
    """The frontier values for a batch, then the downstream pass from them.

    Values are passed keyed by node name. The downstream pass is generated Python code (an
    ``fx.GraphModule``) that makes the same calls as the traced model, in the same order.
    """

    def __init__(
        self,
        runner: PartialRunner,
        frontier: list,
        downstream: list,
        full: bool,
        reused: list | None = None,
    ) -> None:
        self.runner = runner
        self.frontier = frontier
        self.downstream = downstream
        self.full = full
        self.reused: list[fx.Node] = reused or []
        self._upstream: list[fx.Node] = []
        self._forward: fx.GraphModule | None = None
        self._reused_pass: fx.GraphModule | None = None
        if not full:
            needed: set[fx.Node] = set(frontier)
            nodes = list(runner.graph_module.graph.nodes)  # type: ignore[union-attr]
            for node in reversed(nodes):
                if node in needed:
                    needed.update(node.all_input_nodes)
            self._upstream = [n for n in nodes if n in needed]

    @property
    def frontier_names(self) -> list[str]:
        return [n.name for n in self.frontier]

    @property
    def reused_layers(self) -> list[str]:
        """The layers whose outputs :meth:`forward` takes as selections of stored outputs."""
        return [str(n.target) for n in self.reused]

    def frontier_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values entering the region for input ``x`` (none without a graph)."""
        if self.full:
            return {}
        env = _run(self.runner.graph_module, self._upstream, {}, x)
        return {n.name: env[n] for n in self.frontier}

    def reused_values(self, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Outputs of the reused layers (see :attr:`reused_layers`) from frontier values, for
        the model as it is now (call this before the change)."""
        if not self.reused:
            return []
        if self._reused_pass is None:
            self._reused_pass = self._compile(self.reused, [tuple(self.reused)], set())
        return list(self._reused_pass(*(values[n.name] for n in self.frontier)))

    def forward(
        self,
        values: dict[str, torch.Tensor],
        x: torch.Tensor,
        reused: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The model's output from frontier values (and the reused layers' outputs, in the
        order of :attr:`reused_layers`); a full forward pass of ``x`` without a graph."""
        if self.full:
            return self.runner.module(x)
        if self._forward is None:
            self._forward = self._compile(self.downstream, None, set(self.reused))
        if len(reused or ()) != len(self.reused):
            raise ValueError(f"expected {len(self.reused)} reused outputs")
        frontier = (values[n.name] for n in self.frontier)
        return self._forward(*frontier, *(reused or ()))

    def _compile(self, nodes: list, output: list | None, given: set) -> fx.GraphModule:
        """``nodes`` as a function of the frontier values then the ``given`` nodes' values,
        returning the graph's output or the values of ``output``."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in [*self.frontier, *(n for n in nodes if n in given)]:
            env[node] = graph.placeholder(node.name)
        for node in nodes:
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], env.__getitem__))
            elif node not in given:
                env[node] = graph.node_copy(node, env.__getitem__)
        if output is not None:
            graph.output(fx.map_arg(output[0], env.__getitem__))
        return fx.GraphModule(self.runner.graph_module, graph)  # type: ignore[arg-type]


def peak_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """The largest output of any layer of ``module`` for input ``x``, in bytes."""
    peak = 0

    def hook(_mod: nn.Module, _inp: object, out: object) -> None:
        nonlocal peak
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                peak = max(peak, value.numel() * value.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return peak


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
