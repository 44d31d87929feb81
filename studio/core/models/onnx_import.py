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
from studio.core.jobs import ProgressFn, report
from studio.core.models.graph import mark_attention_heads
from studio.core.models.loaded import ONNX, LoadedModel, resolve_input_shape
from studio.core.models.onnx_converters import onnx2torch_convert

# largest difference from ONNX Runtime accepted, relative to max(1, largest output magnitude)
MAX_RELATIVE_DIFF = 1e-3
_CONSTANT_VALUES = ("value", "value_float", "value_floats", "value_int", "value_ints")


def load_onnx(
    path: Path, input_shape: tuple[int, ...] | None = None, progress: ProgressFn | None = None
) -> LoadedModel:
    """Convert the ONNX model in ``path`` to torch and verify it against ONNX Runtime."""
    report(progress, 0.0, f"reading {path.name}")
    model = _read(path)
    report(progress, 0.1, "loading it in ONNX Runtime")
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
    report(progress, 0.25, "normalising the graph (constants, linear layers, split convolutions)")
    normalised = _normalise(model, notes, graph_input.name, shape)
    report(progress, 0.45, "converting to torch (onnx2torch)")
    module = _convert(normalised, path, notes)
    report(progress, 0.65, "checking the conversion against ONNX Runtime")
    batch_sizes = (1, 2) if dims is None or not isinstance(dims[0], int) else (shape[0],)
    diff = _verify(path, session, module, graph_input, shape, batch_sizes, notes)
    report(progress, 0.9, "looking for attention heads")
    heads = mark_attention_heads(module, torch.zeros(shape))
    if heads:
        notes.append(f"found {heads} projection(s) split into attention heads")
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
        onnx_opset=_declared_opset(model),
        onnx_dynamic_axes=_declared_axes(model),
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


def _normalise(
    model: onnx.ModelProto,
    notes: list[str],
    input_name: str | None = None,
    shape: tuple[int, ...] | None = None,
) -> onnx.ModelProto:
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
    # after inference: the shapes it wrote for the products stay when a Gemm on 3-D is not
    # inferred again (the converter's LayerNorm reads them)
    fused = _matmuls_as_gemm(copy.graph)
    if fused:
        notes.append(f"read {fused} MatMul (+ Add) node(s) with constant weights as linear layers")
    if input_name is not None and shape is not None:
        _fold_slice_bounds(copy, input_name, shape)
    split = _split_convs(copy.graph)
    if split:
        notes.append(f"read {split} convolution(s) whose output is split as one per part")
    return copy


def _fold_slice_bounds(model: onnx.ModelProto, input_name: str, shape: tuple[int, ...]) -> int:
    """Turn the computed bounds of channel Slices into constants where they are constant.

    torch.onnx writes ``x.chunk(2, 1)`` on a dynamic-shape graph as Slices whose bounds are
    computed from ``Shape(x)``; the channel count is fixed, so the bounds are too. They are
    evaluated by ONNX Runtime at two input sizes and kept only when both agree.
    """
    values = {t.name for t in model.graph.initializer}
    wanted = [
        n
        for n in model.graph.node
        if n.op_type == "Slice" and any(i and i not in values for i in n.input[1:])
    ]
    names = sorted({i for n in wanted for i in n.input[1:] if i and i not in values})
    if not names:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in names
    )
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        results = []
        for scale in (1, 2):
            x = np.zeros((shape[0] * scale, *shape[1:]), dtype=np.float32)
            results.append(session.run(names, {input_name: x}))
    except Exception:  # inputs that are not float, bounds that are not int64: leave them
        return 0
    folded = {
        name: first
        for name, first, second in zip(names, *results, strict=True)
        if np.array_equal(first, second)
    }
    count = 0
    for node in wanted:
        bounds = [i for i in node.input[1:] if i and i not in values]
        if all(b in folded for b in bounds):
            for k, name in enumerate(node.input):
                if k and name in folded:
                    const = f"{name}.folded"
                    if const not in values:
                        model.graph.initializer.append(
                            numpy_helper.from_array(np.asarray(folded[name]), const)
                        )
                        values.add(const)
                    node.input[k] = const
            count += 1
    if count:
        _drop_dead_nodes(model.graph)
    return count


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (the Shape arithmetic of folded bounds)."""
    nodes = list(graph.node)
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in nodes
        for a in n.attribute
    ):
        return  # subgraphs read outer values by name: what is dead is not plain to see
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    if len(kept) != len(nodes):
        del graph.node[:]
        graph.node.extend(reversed(kept))


_UNARY = {"Relu", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Tanh", "Clip"}


def _split_convs(graph: onnx.GraphProto) -> int:
    """Rewrite ``Split(act(Conv(x)))`` on channels as one convolution (and activation) per
    part; returns how many were rewritten.

    A C2f or CSP block splits one convolution's output in two; Torch-Pruning cannot follow
    channel indices through a split whose parts meet again in a concat, so those groups would
    be left whole. Computing each part with its own slice of the weights is the same arithmetic
    (Ultralytics' own pruning recipe rewrites C2f this way), and each part is a group of its own.
    The activation may be a unary op or SiLU as exported (``Mul(c, Sigmoid(c))``).
    """
    values = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    parts_of = [
        (node, [node], node.input[0]) for node in graph.node if node.op_type == "Split"
    ] + _slice_partitions(graph, readers, values)
    for split, removed_parts, source in parts_of:
        if split.domain not in ("", "ai.onnx") or any(id(n) in removed for n in removed_parts):
            continue
        found = _conv_chain(source, producer, readers, values, outputs, len(removed_parts))
        if split.op_type == "Split":
            sizes = _split_sizes(split, values, found[0] if found else None)
            outs = list(split.output)
        else:
            sizes = [end - start for start, end in (_slice_range(n, values) for n in removed_parts)]
            outs = [n.output[0] for n in removed_parts]
            width = int(values[found[0].input[1]].dims[0]) if found else -1
            if sum(sizes) != width:
                sizes = None
        if found is None or sizes is None:
            continue
        conv, chain = found
        weight = numpy_helper.to_array(values[conv.input[1]])
        bias = numpy_helper.to_array(values[conv.input[2]]) if len(conv.input) > 2 else None
        new_nodes: list[onnx.NodeProto] = []
        start = 0
        for k, (size, out) in enumerate(zip(sizes, outs, strict=True)):
            tag = f"{conv.name or conv.output[0]}_part{k}"
            w = numpy_helper.from_array(weight[start : start + size], f"{tag}.weight")
            inputs = [conv.input[0], w.name]
            graph.initializer.append(w)
            if bias is not None:
                b = numpy_helper.from_array(bias[start : start + size], f"{tag}.bias")
                graph.initializer.append(b)
                inputs.append(b.name)
            start += size
            rename = {conv.output[0]: f"{tag}.out"}
            new_nodes.append(_copy_node(conv, inputs, [rename[conv.output[0]]], tag))
            for node in chain:
                made = out if node is chain[-1] else f"{tag}.{node.output[0]}"
                rename[node.output[0]] = made
                ins = [rename.get(i, i) for i in node.input]
                new_nodes.append(_copy_node(node, ins, [made], f"{tag}/{node.op_type}"))
            if not chain:
                new_nodes[-1].output[0] = out
        removed.update(id(n) for n in (conv, *chain, *removed_parts[1:]))
        replaced[id(split)] = new_nodes
    if not replaced:
        return 0
    nodes = []
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replaced)


def _slice_range(node: onnx.NodeProto, values: dict[str, onnx.TensorProto]) -> tuple[int, int]:
    """(start, end) of a constant single-axis channel Slice with step 1; (0, 0) otherwise."""
    ins = list(node.input) + [""] * (5 - len(node.input))
    if any(i and i not in values for i in ins[1:5]) or not (ins[1] and ins[2]):
        return 0, 0
    read = [numpy_helper.to_array(values[i]).tolist() if i else None for i in ins[1:5]]
    starts, ends, axes, steps = read
    if (
        len(starts) != 1
        or (axes is not None and axes not in ([1], [-3]))
        or steps not in (None, [1])
    ):
        return 0, 0
    return int(starts[0]), int(ends[0])


def _slice_partitions(
    graph: onnx.GraphProto,
    readers: dict[str, list[onnx.NodeProto]],
    values: dict[str, onnx.TensorProto],
) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto], str]]:
    """Tensors read only by channel Slices that cut them into consecutive parts from 0:
    (first slice, the slices in order, the tensor)."""
    found = []
    for name, nodes in readers.items():
        if len(nodes) < 2 or any(n.op_type != "Slice" or n.input[0] != name for n in nodes):
            continue
        ranges = sorted((_slice_range(n, values), i) for i, n in enumerate(nodes))
        if ranges[0][0][0] != 0 or any(r[0][1] <= r[0][0] for r in ranges):
            continue
        if any(a[0][1] != b[0][0] for a, b in zip(ranges, ranges[1:])):
            continue
        ordered = [nodes[i] for _, i in ranges]
        found.append((ordered[0], ordered, name))
    return found


def _conv_chain(
    name: str,
    producer: dict[str, onnx.NodeProto],
    readers: dict[str, list[onnx.NodeProto]],
    values: dict[str, onnx.TensorProto],
    outputs: set[str],
    parts: int = 1,
) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The ungrouped Conv with constant weights whose output, through an optional activation
    read by nothing else, is ``name``; with the activation's nodes in order."""
    node = producer.get(name)
    chain: list[onnx.NodeProto] = []
    if node is not None and node.op_type in _UNARY:
        chain = [node]
        node = producer.get(node.input[0])
    elif node is not None and node.op_type == "Mul" and len(node.input) == 2:
        a, b = (producer.get(i) for i in node.input)
        for gate, other in ((a, node.input[1]), (b, node.input[0])):
            if gate is not None and gate.op_type == "Sigmoid" and gate.input[0] == other:
                chain, node = [gate, node], producer.get(other)
                break
        else:
            return None
    if node is None or node.op_type != "Conv" or node.input[1] not in values:
        return None
    if len(node.input) > 2 and node.input[2] not in values:
        return None
    if any(a.name == "group" and a.i != 1 for a in node.attribute):
        return None
    for i in [node.output[0]] + [n.output[0] for n in chain[:-1]]:
        if i in outputs or any(r not in chain for r in readers.get(i, [])):
            return None
    last = chain[-1].output[0] if chain else node.output[0]
    if last in outputs or len(readers.get(last, [])) != parts:
        return None
    for gate in chain:  # constant inputs only (Clip's bounds), beside the chain's own
        for i in gate.input[1:]:
            if i and i not in values and i not in {n.output[0] for n in chain} | {node.output[0]}:
                return None
    return node, chain


def _split_sizes(
    split: onnx.NodeProto, values: dict[str, onnx.TensorProto], conv: onnx.NodeProto | None
) -> list[int] | None:
    """The channel sizes of a Split on axis 1 of a convolution's output; None otherwise."""
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    if conv is None or attrs.get("axis", 0) not in (1, -3):
        return None
    width = int(values[conv.input[1]].dims[0])
    if len(split.input) > 1 and split.input[1]:
        if split.input[1] not in values:
            return None
        sizes = [int(v) for v in numpy_helper.to_array(values[split.input[1]])]
    elif "split" in attrs:
        sizes = [int(v) for v in attrs["split"]]
    else:
        parts = int(attrs.get("num_outputs", len(split.output)))
        each = -(-width // parts)
        sizes = [min(each, width - k * each) for k in range(parts)]
    if sum(sizes) != width or len(sizes) != len(split.output) or min(sizes) <= 0:
        return None
    return sizes


def _copy_node(
    node: onnx.NodeProto, inputs: list[str], outputs: list[str], name: str
) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(inputs)
    del copy.output[:]
    copy.output.extend(outputs)
    copy.name = name
    return copy


def _matmuls_as_gemm(graph: onnx.GraphProto) -> int:
    """Rewrite ``MatMul(x, W)`` with a constant 2-D ``W`` (and the ``Add`` of a constant bias
    that follows it, if nothing else reads the product) as one ``Gemm`` node, which the
    converter turns into ``nn.Linear``; returns how many were rewritten.

    torch.onnx writes a linear layer on a 3-D input (a transformer's tokens) as MatMul + Add;
    converted as they are, its weights are constants the dependency graph cannot prune.
    ``nn.Linear`` applies to the last dimension of any input, which is what the pair computes
    (a Gemm on more than two dimensions is not valid ONNX, but this graph only feeds the
    converter; ONNX Runtime runs the user's file).
    """
    values = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    rewritten: dict[int, onnx.NodeProto] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        x, w = node.input
        weight = values.get(w)
        if weight is None or len(weight.dims) != 2 or x in values:
            continue
        product, bias, out = node.output[0], None, node.output[0]
        after = readers.get(product, [])
        if len(after) == 1 and product not in outputs and after[0].op_type == "Add":
            add = after[0]
            other = add.input[1] if add.input[0] == product else add.input[0]
            tensor = values.get(other)
            if tensor is not None and list(tensor.dims) == [weight.dims[1]]:
                bias, out = other, add.output[0]
                dropped.add(id(add))
        inputs = [x, w] + ([bias] if bias else [])
        rewritten[id(node)] = helper.make_node("Gemm", inputs, [out], name=node.name)
    if not rewritten:
        return 0
    nodes = [rewritten.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(rewritten)


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


def _declared_opset(model: onnx.ModelProto) -> int | None:
    """The ai.onnx opset the file imports (None if it imports only other domains)."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else None


def _declared_axes(model: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """Per graph input (not initializer) and output, its dynamic dims: index -> the dim's
    symbolic name, or ``NAME_dimI`` for a dim with neither a name nor a size. Tensors without
    a declared shape, or with only fixed dims, are left out."""
    initializers = {t.name for t in model.graph.initializer}
    values = [i for i in model.graph.input if i.name not in initializers]
    axes: dict[str, dict[int, str]] = {}
    for value in (*values, *model.graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = {
            i: d.dim_param or f"{value.name}_dim{i}"
            for i, d in enumerate(tensor.shape.dim)
            if d.dim_param or d.dim_value <= 0
        }
        if dims:
            axes[value.name] = dims
    return axes
