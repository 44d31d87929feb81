"""Loading an ONNX file from any framework as a torch module, checked against ONNX Runtime.

The graph is normalised before conversion (weights held in Constant nodes, as Paddle2ONNX writes
them, become initializers; shapes are inferred), converted with onnx2torch (simplified with
onnxslim first if the plain graph does not convert), and the result is run beside ONNX Runtime
on the same seeded inputs: a converted model that does not reproduce the file is refused.
onnx2torch 1.5 stops at opset 17 for several ops: :mod:`studio.core.models.onnx_converters` fills
the gaps that torch.onnx.export's opset-20 graphs hit.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from studio.core.errors import StudioError, first_line
from studio.core.models.loaded import ONNX, LoadedModel, resolve_input_shape
from studio.core.models.onnx_converters import onnx2torch_convert

# largest difference from ONNX Runtime accepted, relative to max(1, largest output magnitude)
MAX_RELATIVE_DIFF = 1e-3
_CONSTANT_VALUES = ("value", "value_float", "value_floats", "value_int", "value_ints")


def load_onnx(path: Path, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Convert the ONNX model in ``path`` to torch and verify it against ONNX Runtime."""
    model = _read(path)
    session, notes = _session(path, model)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs)
        raise StudioError(
            f"{path.name} has {len(inputs)} inputs ({names}); the studio supports "
            "models with a single input tensor"
        )
    graph_input = inputs[0]
    dims = _input_dims(graph_input)
    shape = resolve_input_shape(dims, input_shape, f"{path.name}: input {graph_input.name!r}")
    module = _convert(_normalise(model, notes), path, notes)
    batch_sizes = (1, 2) if dims is None or not isinstance(dims[0], int) else (shape[0],)
    diff = _verify(path, session, module, graph_input, shape, batch_sizes, notes)
    return LoadedModel(
        module,
        path.name,
        str(path),
        ONNX,
        shape,
        path=path,
        input_names=(graph_input.name,),
        output_names=tuple(o.name for o in model.graph.output),
        notes=notes,
        onnx_max_diff=diff,
    )


def _read(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf DecodeError, external data errors...
        raise StudioError(
            f"{path.name} is not a valid ONNX file (it could not be parsed: {first_line(error)})"
        ) from None
    if not model.graph.node:
        raise StudioError(f"{path.name} is not an ONNX model (it holds no graph)")
    return model


def _session(path: Path, model: onnx.ModelProto) -> tuple[Any, list[str]]:
    """An ONNX Runtime session on the file, and a note if onnx.checker objects to a model that
    ONNX Runtime loads anyway (the checker is stricter, e.g. about outputs without a shape)."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(model)
        problem = None
    except Exception as error:  # ValidationError and friends
        problem = first_line(error)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        if problem:
            raise StudioError(f"{path.name} is not a valid ONNX model: {problem}") from None
        raise StudioError(
            f"ONNX Runtime cannot load {path.name}, so its conversion cannot be "
            f"checked: {first_line(error)}"
        ) from None
    return session, ([f"onnx.checker: {problem} (ONNX Runtime loads it)"] if problem else [])


def _input_dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Each dim as an int when fixed, its symbolic name or None when dynamic; None if no shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.dim_value > 0 else (d.dim_param or None) for d in tensor.shape.dim]


def _normalise(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """A copy with constant-valued nodes turned into initializers and shapes inferred.

    onnx2torch wants weights as initializers: Paddle2ONNX keeps them in Constant nodes, and
    torch.onnx.export reaches shared weights through Identity nodes.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    outputs = {o.name for o in graph.output}
    if copy.ir_version >= 4:  # older IRs must also list initializers as graph inputs
        values = {t.name: t for t in graph.initializer}
        kept, moved = [], 0
        for node in graph.node:
            tensor = _constant_tensor(node, values) if node.output[0] not in outputs else None
            if tensor is None:
                kept.append(node)
            else:
                graph.initializer.append(tensor)
                values[tensor.name] = tensor
                moved += 1
        if moved:
            del graph.node[:]
            graph.node.extend(kept)
            notes.append(f"turned {moved} Constant/Identity nodes into initializers")
    try:
        copy = onnx.shape_inference.infer_shapes(copy)
    except Exception:  # inference is a help for the converter, not a need
        pass
    return copy


def _constant_tensor(
    node: onnx.NodeProto, values: dict[str, onnx.TensorProto]
) -> onnx.TensorProto | None:
    """The output of a Constant node, or of an Identity of a known value, as a named tensor;
    None for any other node (and for sparse or text constants)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Identity" and node.input[0] in values:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(values[node.input[0]])
        tensor.name = node.output[0]
        return tensor
    if node.op_type != "Constant" or len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name not in _CONSTANT_VALUES:
        return None
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        return tensor
    dtype = np.float32 if attribute.name.startswith("value_float") else np.int64
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), node.output[0])


def _convert(model: onnx.ModelProto, path: Path, notes: list[str]) -> torch.nn.Module:
    convert = onnx2torch_convert()
    try:
        return convert(model).eval()
    except Exception as error:  # any converter failure: try a simpler graph
        failure = error
    try:
        import onnxslim

        slimmed = onnxslim.slim(model)
    except Exception:  # onnxslim could not simplify: report the first failure
        raise _conversion_error(failure, model, path) from None
    try:
        module = convert(slimmed).eval()
    except Exception as error:
        raise _conversion_error(error, slimmed, path) from None
    notes.append("simplified the graph with onnxslim before conversion")
    return module


def _conversion_error(error: BaseException, model: onnx.ModelProto, path: Path) -> StudioError:
    version = importlib.metadata.version("onnx2torch")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    match = re.search(r"domain='([^']*)', operation_type='(\w+)'", str(error))
    if match:
        domain, op = match.group(1) or "ai.onnx", match.group(2)
        name = op if domain == "ai.onnx" else f"{domain}.{op}"
        return StudioError(
            f"{path.name}: operation {name} (opset {opsets.get(domain, '?')}) is "
            f"not supported by the ONNX converter (onnx2torch {version})"
        )
    opset = opsets.get("ai.onnx", "?")
    return StudioError(
        f"{path.name}: the ONNX converter (onnx2torch {version}, opset {opset}) "
        f"failed: {type(error).__name__}: {first_line(error)}"
    )


def _verify(
    path: Path,
    session: Any,
    module: torch.nn.Module,
    graph_input: onnx.ValueInfoProto,
    shape: tuple[int, ...],
    batch_sizes: tuple[int, ...],
    notes: list[str],
) -> float:
    """Largest absolute output difference between ONNX Runtime on the file and ``module``."""
    dtype = helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch in batch_sizes:
        x = _random_input(rng, (batch, *shape[1:]), dtype)
        try:
            expected = session.run(None, {graph_input.name: x})
        except Exception as error:  # a batch the file does not really allow
            if batch == batch_sizes[0]:
                raise StudioError(
                    f"ONNX Runtime cannot run {path.name} on an input of shape "
                    f"{x.shape}: {first_line(error)}"
                ) from None
            notes.append(f"ONNX Runtime does not run {path.name} at batch {batch}")
            break
        try:
            with torch.no_grad():
                got = module(torch.from_numpy(x))
        except Exception as error:
            raise StudioError(
                f"the torch conversion of {path.name} fails at batch {batch}: {first_line(error)}"
            ) from None
        got_list = list(got) if isinstance(got, tuple | list) else [got]
        if len(got_list) != len(expected):
            raise StudioError(
                f"the torch conversion of {path.name} gives {len(got_list)} "
                f"outputs, ONNX Runtime {len(expected)}"
            )
        for want, have in zip(expected, got_list, strict=True):
            have_np = have.detach().numpy()
            if have_np.shape != want.shape:
                raise StudioError(
                    f"the torch conversion of {path.name} gives an output of shape "
                    f"{have_np.shape} where ONNX Runtime gives {want.shape}"
                )
            diff = _max_abs_diff(want, have_np)
            scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
            if not diff / scale <= MAX_RELATIVE_DIFF:
                raise StudioError(
                    f"the torch conversion of {path.name} does not match ONNX "
                    f"Runtime (largest difference {diff:.3g} at batch {batch}, "
                    f"output scale {scale:.3g})"
                )
            worst = max(worst, diff)
    batches = " and ".join(str(b) for b in batch_sizes)
    notes.append(
        f"converted with onnx2torch; largest difference from ONNX Runtime {worst:.2g} "
        f"(batch {batches})"
    )
    return worst


def _random_input(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iub":  # ids or masks: small non-negative values are valid for most
        return rng.integers(0, 2, size=shape).astype(dtype)
    raise StudioError(f"the studio cannot feed inputs of type {dtype} to an ONNX model")


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    diff[np.isnan(a64) & np.isnan(b64)] = 0.0
    return float(np.max(np.nan_to_num(diff, nan=np.inf), initial=0.0))
