"""Which layout ONNX Runtime's CPU provider runs each layer of a pruned model in, and the nodes
that a plan's channel counts add, decided from the unpruned model's graph and the plan's channel
counts (the pruned model is neither built nor run).

ONNX Runtime's NCHWc transformer (onnxruntime/core/optimizer/nchwc_transformer.cc) runs a
convolution in the blocked NCHWc layout only when its channel counts allow it (a plain
convolution: fewer input channels than a block, or a multiple of the block; a depthwise one: a
multiple of the block of output channels), and then inserts a ``ReorderInput`` in front of a
convolution whose input is in plain NCHW, a ``ReorderOutput`` behind an NCHWc tensor that a
plain node reads, and fuses an addition (and the activation after it) into an NCHWc
convolution only when both its inputs are NCHWc. A pruned model whose channel counts are not
multiples of the block therefore runs extra reorders, additions and activations that neither
the unpruned model nor a single layer shows; :meth:`LayoutGraph.simulate` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# ConvActivationFusion: these activations fuse into the convolution before them, in any layout
_FUSED_ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid"}
# the activations that run on an NCHWc tensor (TransformActivation); others read plain NCHW
_NCHWC_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh"}
_ALIASES = {"Identity", "Dropout"}
EXTRA_KINDS = ("ReorderInput", "ReorderOutput", "Add", "Relu")


def nchwc_block() -> int:
    """ONNX Runtime's (MLAS) NCHWc block on this CPU: 16 channels with AVX-512, else 8."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8


def conv_runs_nchwc(c_in: int, c_out: int, groups: int, block: int) -> bool:
    """Whether ONNX Runtime converts a convolution with these counts (weights ``c_out x
    c_in/groups``) to NCHWc. Checked against the graphs ONNX Runtime 1.2x-1.3x builds on
    AVX2 (tests/core/test_latency_layout.py): a plain convolution with fewer input channels
    than a block reads NCHW directly, one with a multiple of 4 has its input padded to whole
    blocks (ReorderInput handles multiples of 4); a depthwise one needs a multiple of 4."""
    if groups > 1:
        if groups == c_in == c_out:  # depthwise
            return c_out % 4 == 0
        per_group = (c_in // groups, c_out // groups)
        return c_out % block == 0 and all(c % block == 0 for c in per_group)
    return c_in < block or c_in % 4 == 0


@dataclass(frozen=True)
class _Node:
    op: str  # "conv", "add", "act", "gap" (global pooling), "pool", "concat", "other"
    inputs: tuple[str, ...]
    output: str
    layer: str = ""  # conv: the module it is
    groups: int = 1  # conv: groups of a grouped (not depthwise) convolution
    depthwise: bool = False
    activation: bool = False  # conv: an activation fused behind it
    act_type: str = ""  # the ONNX operator of other nodes


@dataclass
class Layout:
    """What ONNX Runtime builds for one plan: the convolutions in NCHWc, and each extra node
    (kind, elements of the tensor it reads or writes, batch 1)."""

    nchwc: dict[str, bool]
    extra: list[tuple[str, float]]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(EXTRA_KINDS, 0)
        for kind, _ in self.extra:
            out[kind] += 1
        return out


class LayoutGraph:
    """The unpruned model's ONNX graph reduced to what the NCHWc transformer looks at."""

    def __init__(self, nodes: list[_Node], spatial: dict[str, float], outputs: set[str]) -> None:
        self.nodes = nodes
        self.spatial = spatial  # tensor -> height * width (1 for vectors)
        self.outputs = outputs
        self.layers = [n.layer for n in nodes if n.op == "conv"]

    @classmethod
    def from_onnx(cls, data: bytes) -> LayoutGraph:
        """From an exported model (:func:`studio.core.models.onnx_io.onnx_bytes`): batch norms
        folded into the convolution before them, activations right behind a convolution fused
        into it (ONNX Runtime does both before choosing layouts)."""
        import onnx

        model = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
        graph = model.graph
        weights = {t.name: t for t in graph.initializer}
        spatial: dict[str, float] = {}
        for info in [*graph.value_info, *graph.input, *graph.output]:
            dims = info.type.tensor_type.shape.dim
            if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
                spatial[info.name] = float(dims[2].dim_value * dims[3].dim_value)
        consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        outputs = {o.name for o in graph.output}
        alias: dict[str, str] = {}
        nodes: list[_Node] = []
        conv_of: dict[str, int] = {}  # conv output tensor -> index in nodes (fusion targets)

        def real(name: str) -> str:
            while name in alias:
                name = alias[name]
            return name

        for node in graph.node:
            if node.op_type == "Constant":
                continue
            ins = tuple(real(i) for i in node.input if i and i not in weights)
            out = node.output[0]
            if node.op_type in _ALIASES or (
                node.op_type == "BatchNormalization" and ins and ins[0] in conv_of
            ):
                alias[out] = ins[0]
                continue
            source = ins[0] if ins else ""
            i = conv_of.get(source, -1)
            read = node.input[0] if node.input else ""  # the name its consumers are counted on
            if (
                node.op_type in _FUSED_ACTIVATIONS
                and i >= 0
                and not nodes[i].activation
                and consumers.get(read, 0) == 1
                and read not in outputs
            ):
                nodes[i] = replace(nodes[i], activation=True)
                alias[out] = source
                continue
            if node.op_type == "Conv" and node.input[1] in weights:
                dims = weights[node.input[1]].dims
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                depthwise = group > 1 and dims[1] == 1 and group == dims[0]
                layer = node.input[1].removesuffix(".weight")
                conv_of[out] = len(nodes)
                nodes.append(_Node("conv", ins[:1], out, layer, int(group), depthwise))
                continue
            op = {
                "Add": "add",
                "Sum": "add",
                "GlobalAveragePool": "gap",
                "GlobalMaxPool": "gap",
                "MaxPool": "pool",
                "AveragePool": "pool",
                "Concat": "concat",
            }.get(node.op_type, "act" if node.op_type in _FUSED_ACTIVATIONS else "other")
            nodes.append(_Node(op, ins, out, act_type=node.op_type))
        return cls(nodes, spatial, outputs)

    def simulate(
        self,
        channels: dict[str, tuple[int, int]],
        block: int,
    ) -> Layout:
        """The layout of every convolution and the extra nodes for the plan whose layers have
        ``channels[layer] = (c_in, c_out)``."""
        nchwc: dict[str, bool] = {}
        extra: list[tuple[str, float]] = []
        blocked: dict[str, int] = {}  # NCHWc tensor -> logical channels
        count: dict[str, int] = {}  # channels of every tensor
        fusable: dict[str, bool] = {}  # tensor made by a single-use NCHWc/plain conv, no act
        plain_conv: dict[str, bool] = {}  # tensor made by a plain convolution
        reordered_in: set[str] = set()
        to_plain: set[str] = set()  # NCHWc tensors read in NCHW: one ReorderOutput each
        uses = self._uses()

        def padded(c: int) -> int:
            return -(-c // block) * block

        def elements(name: str, c: int) -> float:
            return c * self.spatial.get(name, 1.0)

        def need_plain(name: str) -> None:
            if name in blocked:
                to_plain.add(name)

        def need_blocked(name: str) -> None:
            if name not in blocked and name not in reordered_in:
                reordered_in.add(name)
                extra.append(("ReorderInput", elements(name, padded(count.get(name, 0)))))

        for node in self.nodes:
            first = node.inputs[0] if node.inputs else ""
            if node.op == "conv":
                c_in, c_out = channels[node.layer]
                count.setdefault(first, c_in)  # the model's input
                groups = c_out if node.depthwise else node.groups  # depthwise: c_in == c_out
                is_blocked = conv_runs_nchwc(c_in, c_out, groups, block)
                nchwc[node.layer] = is_blocked
                count[node.output] = c_out
                if is_blocked:
                    if groups > 1 or c_in >= block:
                        need_blocked(first)
                    else:  # reads plain NCHW directly
                        need_plain(first)
                    blocked[node.output] = c_out
                else:
                    need_plain(first)
                    plain_conv[node.output] = True
                fusable[node.output] = not node.activation and uses.get(node.output, 0) == 1
            elif node.op == "add":
                a, b = node.inputs[0], node.inputs[-1]
                c = count.get(a, 0)
                count[node.output] = c
                if a in blocked and b in blocked and blocked[a] == blocked[b]:
                    target = next((t for t in (a, b) if fusable.get(t)), None)
                    if target is None:
                        extra.append(("Add", elements(node.output, padded(c))))
                    blocked[node.output] = c
                else:
                    need_plain(a)
                    need_plain(b)
                    target = next((t for t in (a, b) if plain_conv.get(t) and fusable.get(t)), None)
                    if target is None:
                        extra.append(("Add", elements(node.output, c)))
                    else:
                        plain_conv[node.output] = True
                if target is not None:  # the addition runs inside that convolution
                    fusable[target] = False
                    fusable[node.output] = uses.get(node.output, 0) == 1
            elif node.op == "act":
                c = count.get(first, 0)
                count[node.output] = c
                if fusable.get(first):  # into the convolution (and addition) before it
                    fusable[first] = False
                    if first in blocked:
                        blocked[node.output] = c
                    plain_conv[node.output] = plain_conv.get(first, False)
                    continue
                if first in blocked and node.act_type in _NCHWC_ACTIVATIONS:
                    blocked[node.output] = c
                    extra.append(("Relu", elements(node.output, padded(c))))
                else:
                    need_plain(first)
                    extra.append(("Relu", elements(node.output, c)))
            elif node.op in ("gap", "pool"):
                c = count.get(first, 0)
                count[node.output] = c
                if c % block == 0 and (node.op == "pool" or first in blocked):
                    if node.op == "pool":
                        need_blocked(first)
                    blocked[node.output] = c
                else:
                    need_plain(first)
            elif node.op == "concat":
                c = sum(count.get(i, 0) for i in node.inputs)
                count[node.output] = c
                if all(i in blocked and blocked[i] % block == 0 for i in node.inputs):
                    blocked[node.output] = c
                else:
                    for i in node.inputs:
                        need_plain(i)
            else:
                for i in node.inputs:
                    need_plain(i)
                count[node.output] = count.get(first, 0)
        for name in self.outputs:
            need_plain(name)
        for name in to_plain:
            extra.append(("ReorderOutput", elements(name, padded(blocked[name]))))
        return Layout(nchwc, extra)

    def _uses(self) -> dict[str, int]:
        uses: dict[str, int] = {}
        for node in self.nodes:
            for name in node.inputs:
                uses[name] = uses.get(name, 0) + 1
        for name in self.outputs:
            uses[name] = uses.get(name, 0) + 1
        return uses


def node_costs(extra: list[tuple[str, float]]) -> np.ndarray:
    """Elements per extra node kind, in :data:`EXTRA_KINDS` order (for the fit's features)."""
    out = np.zeros(len(EXTRA_KINDS))
    for kind, n in extra:
        out[EXTRA_KINDS.index(kind)] += n
    return out
