"""onnx2torch, imported safely and taught the ONNX versions and ops it lacks.

onnx2torch 1.5 stops at opset 17 for several ops. This module fills the gaps that
torch.onnx.export's opset-20 graphs hit (newer op versions, Gelu, Split-18, reductions, LSTM),
and keeps onnx2torch's import-time torchvision dependency from breaking beside the CPU torch.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import onnx
import torch
from onnx import defs

from studio.core import isolation
from studio.core.errors import StudioError, first_line


@functools.cache
def onnx2torch_convert() -> Callable[[onnx.ModelProto], torch.nn.Module]:
    """onnx2torch's ``convert``, imported once and taught a few newer ONNX versions."""
    try:
        with _torchvision_for_onnx2torch():
            import onnx2torch
            from onnx2torch.node_converters.registry import (
                _CONVERTER_REGISTRY,
                OperationDescription,
                add_converter,
            )
    except ImportError as error:
        raise StudioError(
            f"ONNX import needs the onnx2torch package: {first_line(error)}"
        ) from None

    def register(op: str, version: int, converter: Callable[..., Any]) -> None:
        if OperationDescription("", op, version) not in _CONVERTER_REGISTRY:
            add_converter(op, version)(converter)

    _add_converters(register)
    _serve_newer_versions(_CONVERTER_REGISTRY, register)
    return onnx2torch.convert


# a window job's process that unpickles an ONNX import (onnx2torch modules) imports onnx2torch
# the way onnx2torch_convert does
isolation.on_missing_module("torchvision", onnx2torch_convert)


@contextlib.contextmanager
def _torchvision_for_onnx2torch() -> Iterator[None]:
    """Make ``import torchvision`` work while onnx2torch is imported, and no longer.

    onnx2torch imports torchvision at import time, for its NonMaxSuppression and RoiAlign
    converters only. The CPU torch wheel the studio installs has no torchvision that loads beside
    it ('operator torchvision::nms does not exist'), so unless the real one imports, a placeholder
    whose functions raise StudioError stands in during the import; then the two sys.modules
    entries are put back as they were, so nothing else in the process sees a fake torchvision.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from a mismatched build
        pass
    else:
        yield
        return
    names = ("torchvision", "torchvision.ops")
    saved = {name: sys.modules.get(name) for name in names}
    package, ops = types.ModuleType(names[0]), types.ModuleType(names[1])
    ops.nms = ops.box_convert = ops.roi_align = _torchvision_missing  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    sys.modules.update({names[0]: package, names[1]: ops})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _torchvision_missing(*args: Any, **kwargs: Any) -> Any:
    raise StudioError(
        "this ONNX model uses NonMaxSuppression/RoiAlign, which need torchvision, "
        "which is not available beside the installed torch"
    )


def _serve_newer_versions(registry: dict[Any, Any], register: Callable[..., None]) -> None:
    """Convert op versions newer than onnx2torch knows with its converter for the newest version
    it knows, when the newer schema has the same inputs, outputs and attributes (the ONNX releases
    since opset 19 mostly widened types: float8, int4, bfloat16). Without this, the opset-20 graphs
    torch.onnx.export writes fail on Identity, Reshape and Shape. The ONNX Runtime check after
    conversion catches a version whose meaning changed anyway."""
    newest: dict[str, Any] = {}
    for known in registry:
        if known.domain == "" and known.version > getattr(
            newest.get(known.operation_type), "version", 0
        ):
            newest[known.operation_type] = known
    for op, known in newest.items():
        try:
            base = _signature(defs.get_schema(op, known.version))
        except defs.SchemaError:
            continue
        for later in _newer_versions(op, known.version):
            if _signature(defs.get_schema(op, later)) != base:
                break
            register(op, later, registry[known])


def _signature(schema: defs.OpSchema) -> tuple[Any, ...]:
    # Cast's 'saturate' (opset 19) only affects casts to float8, which the converter refuses
    attributes = sorted(a for a in schema.attributes if (schema.name, a) != ("Cast", "saturate"))
    return (
        attributes,
        [(i.name, i.option) for i in schema.inputs],
        [(o.name, o.option) for o in schema.outputs],
    )


def _add_converters(register: Callable[..., None]) -> None:
    """Converters onnx2torch lacks for what torch.onnx.export writes: Gelu (an op since opset
    20), Split-18 (``num_outputs``), the opset-18 reductions (``axes`` became an input), LSTM,
    and Resize-18/19 (new attributes; served by the Resize-13 converter at their defaults).
    Later versions with the same signature are served by :func:`_serve_newer_versions`."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    def result(module: torch.nn.Module, node: Any, inputs: tuple[str, ...]) -> Any:
        return OperationConverterResult(module, OnnxMapping(inputs, node.output_values))

    def gelu(node: Any, graph: Any) -> Any:
        approximate = node.attributes.get("approximate", "none")
        return result(torch.nn.GELU(approximate=approximate), node, node.input_values)

    def split(node: Any, graph: Any) -> Any:
        axis = node.attributes.get("axis", 0)
        return result(_Split18(axis, len(node.output_values)), node, node.input_values)

    def reduce(node: Any, graph: Any) -> Any:
        data, axes_name = (*node.input_values, "")[:2]
        if axes_name and axes_name not in graph.initializers:
            raise NotImplementedError(f"{node.operation_type} with computed axes")
        axes = graph.initializers[axes_name].to_torch().tolist() if axes_name else None
        if not axes and node.attributes.get("noop_with_empty_axes", 0):
            return result(torch.nn.Identity(), node, (data,))
        keepdims = node.attributes.get("keepdims", 1)
        return result(OnnxReduceStaticAxes(node.operation_type, axes, keepdims), node, (data,))

    def lstm(node: Any, graph: Any) -> Any:
        names = (*node.input_values, "", "", "", "", "")[:8]  # X W R B lens h0 c0 P
        attrs = node.attributes
        unsupported = [
            what
            for what, present in (
                ("sequence_lens", names[4]),
                ("peepholes", names[7]),
                ("clip", "clip" in attrs),
                ("input_forget", attrs.get("input_forget", 0)),
                (
                    "activations",
                    attrs.get("activations", _LSTM_ACTIVATIONS)[:3] != _LSTM_ACTIVATIONS,
                ),
                ("direction 'reverse'", attrs.get("direction") == "reverse"),
            )
            if present
        ]
        if unsupported or any(n not in graph.initializers for n in names[1:3]):
            raise NotImplementedError(f"LSTM with {', '.join(unsupported) or 'computed weights'}")
        weights = [graph.initializers[n].to_torch() if n else None for n in names[1:4]]
        module = _LSTM(*weights, batch_first=attrs.get("layout", 0) == 1)
        return result(module, node, (names[0], names[5], names[6]))

    def resize(node: Any, graph: Any) -> Any:
        attrs = node.attributes
        if attrs.get("antialias", 0) or attrs.get("axes") is not None:
            raise NotImplementedError("Resize with antialias or axes")
        if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise NotImplementedError("Resize with a keep_aspect_ratio_policy")
        return resize13(node, graph)

    resize13 = _CONVERTER_REGISTRY[OperationDescription("", "Resize", 13)]
    register("Resize", 18, resize)
    register("Resize", 19, resize)

    def hard_sigmoid(node: Any, graph: Any) -> Any:
        attrs = node.attributes
        module = _HardSigmoid(attrs.get("alpha", 0.2), attrs.get("beta", 0.5))
        return result(module, node, node.input_values)

    for version in (1, 6):  # replaces onnx2torch's, which exports as Mul, Add and Clip
        _CONVERTER_REGISTRY[OperationDescription("", "HardSigmoid", version)] = hard_sigmoid
    register("Gelu", 20, gelu)
    register("Split", 18, split)
    for op in _REDUCTIONS:
        register(op, 18, reduce)
    register("LSTM", 7, lstm)
    register("LSTM", 14, lstm)


_LSTM_ACTIVATIONS = ["Sigmoid", "Tanh", "Tanh"]
_REDUCTIONS = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
)


class _HardSigmoidFunction(torch.autograd.Function):
    """max(0, min(1, alpha * x + beta)), written back to ONNX as one HardSigmoid node."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        y = x * alpha + beta
        ctx.save_for_backward(y)
        ctx.alpha = alpha
        return y.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (y,) = ctx.saved_tensors
        return grad * ((y > 0) & (y < 1)).to(grad.dtype) * ctx.alpha, None, None

    @staticmethod
    def symbolic(g: Any, x: Any, alpha: float, beta: float) -> Any:
        return g.op("HardSigmoid", x, alpha_f=alpha, beta_f=beta)


class _HardSigmoid(torch.nn.Module):
    """ONNX HardSigmoid (any alpha: Paddle writes 0.2, torch 1/6). onnx2torch's version is
    exported back as three ops, which made a re-exported MobileNetV3 1.3x slower in ONNX
    Runtime than the file it came from; this one is exported as the one node it was."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HardSigmoidFunction.apply(x, self.alpha, self.beta)


class _Split18(torch.nn.Module):
    """ONNX Split with ``num_outputs`` chunks of ceil(size / n), or the sizes given as input."""

    def __init__(self, axis: int, num_outputs: int) -> None:
        super().__init__()
        self.axis, self.num_outputs = axis, num_outputs

    def forward(
        self, x: torch.Tensor, split: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        if split is not None:
            return torch.split(x, split.tolist(), dim=self.axis)
        return torch.split(x, -(-x.shape[self.axis] // self.num_outputs), dim=self.axis)


class _LSTM(torch.nn.Module):
    """ONNX LSTM (default activations, no peepholes) as one torch.nn.LSTM layer."""

    def __init__(
        self, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, batch_first: bool
    ) -> None:
        super().__init__()
        directions, hidden4, input_size = w.shape
        self.batch_first = batch_first  # ONNX layout 1
        self.lstm = torch.nn.LSTM(
            input_size, hidden4 // 4, batch_first=batch_first, bidirectional=directions == 2
        )
        # ONNX orders the gates i, o, f, c; torch i, f, c(g), o
        order = torch.cat(
            [torch.arange(k * hidden4 // 4, (k + 1) * hidden4 // 4) for k in (0, 2, 3, 1)]
        )
        b = torch.zeros(directions, 2 * hidden4) if b is None else b
        with torch.no_grad():
            for d, suffix in enumerate(("", "_reverse")[:directions]):
                getattr(self.lstm, f"weight_ih_l0{suffix}").copy_(w[d][order])
                getattr(self.lstm, f"weight_hh_l0{suffix}").copy_(r[d][order])
                getattr(self.lstm, f"bias_ih_l0{suffix}").copy_(b[d, :hidden4][order])
                getattr(self.lstm, f"bias_hh_l0{suffix}").copy_(b[d, hidden4:][order])

    def forward(
        self,
        x: torch.Tensor,
        initial_h: torch.Tensor | None = None,
        initial_c: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = None
        given = initial_h if initial_h is not None else initial_c
        if given is not None:
            h0 = torch.zeros_like(given) if initial_h is None else initial_h
            c0 = torch.zeros_like(given) if initial_c is None else initial_c
            if self.batch_first:  # layout 1 keeps batch first in the states too
                h0, c0 = h0.transpose(0, 1), c0.transpose(0, 1)
            state = (h0.contiguous(), c0.contiguous())
        out, (h, c) = self.lstm(x, state)
        directions = h.shape[0]
        # Y: (seq, dirs, batch, hidden) for layout 0, (batch, seq, dirs, hidden) for layout 1
        y = out.unflatten(-1, (directions, -1))
        if not self.batch_first:
            return y.transpose(1, 2), h, c
        return y, h.transpose(0, 1), c.transpose(0, 1)


def _newer_versions(op: str, since: int) -> list[int]:
    """Opset versions after ``since`` at which the ONNX schema of ``op`` changed."""
    versions = {
        defs.get_schema(op, v).since_version
        for v in range(since + 1, defs.onnx_opset_version() + 1)
    }
    return sorted(v for v in versions if v > since)
