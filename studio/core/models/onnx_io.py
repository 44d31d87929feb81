"""Writing a torch module as ONNX, checking that ONNX Runtime runs the file as torch runs the
module, counting what the file holds, and timing it in ONNX Runtime.

The graph is written by torch's TorchScript-based exporter (``dynamo=False``: the dynamo exporter
needs onnxscript, which the studio does not ship) in a way that keeps it one-to-one with the
module, so that its parameter count can be checked against the model's:

- batch norms are not folded into the convolutions before them (``TrainingMode.PRESERVE`` on a
  module in eval mode): ONNX Runtime folds them itself when it loads the file, so nothing is lost;
- initializers with equal values are not merged (``keep_initializers_as_inputs``; the exporter
  otherwise shares the all-ones/all-zeros tensors of freshly initialised norms), and are then
  taken out of the graph's inputs again so that runtimes may constant-fold them.

The file is a single protobuf (no external data), so models are limited to 2 GB.

A file is checked (:func:`verified_onnx`) by running it in ONNX Runtime beside the module on the
same inputs: at two batch sizes when the batch is dynamic and at twice the size of every other
dynamic dim (:func:`probe_inputs`). The largest absolute difference over every output must be at
most ``TOLERANCE`` times ``max(1, largest output magnitude)``: 1e-4 for outputs of ordinary size
(logits, probabilities), relative for the outputs in the thousands that deep networks with random
weights produce, where float32 rounding alone reaches 1e-4. :mod:`studio.core.export` checks its
files of every format this way; :mod:`studio.core.models.pruned_file` its ONNX files.

A model imported from ONNX is written back as its file declared it (:func:`file_names`,
:func:`file_axes`, :func:`supported_opset`): the same input and output names, the same dynamic
dims under the same names, the same opset where torch's exporter can write it.
"""

from __future__ import annotations

import io
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from studio.core.errors import StudioError, first_line
from studio.core.models.loaded import LoadedModel

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20  # ONNX Runtime's quantizer needs 11+; torch's exporter stops at 20
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
_FLOAT_TYPES.add(onnx.TensorProto.BFLOAT16)
TOLERANCE = 1e-4  # largest output difference allowed, times max(1, largest output magnitude)

Axes = Mapping[str, Mapping[int, str]]  # tensor name -> {dim index: symbolic name}
RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]


class BatchShapeError(StudioError):
    """The exported file fails, or gives other shapes, on an input of another size than the one
    it was traced at (or the model itself fails there): its shape is fixed."""


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise StudioError(f"opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET}")


def onnx_bytes(
    module: nn.Module,
    example: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    dynamic_axes: Axes | None = None,
) -> bytes:
    """``module`` (in eval mode) as a serialized ONNX model, checked by ``onnx.checker``.

    Its dims are fixed to ``example``'s but for the first of every input and output when
    ``dynamic_batch``; ``dynamic_axes``, when given, names the dynamic dims instead (see
    :data:`Axes`; an empty mapping fixes every dim).
    """
    check_opset(opset)
    names = (*input_names, *output_names)
    if dynamic_axes is not None:
        axes = {n: dict(dynamic_axes[n]) for n in names if dynamic_axes.get(n)} or None
    else:
        axes = batch_axes(names) if dynamic_batch else None
    buffer = io.BytesIO()
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and constant-folding chatter
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True,
                keep_initializers_as_inputs=True,
            )
    except Exception as error:  # the exporter raises many kinds for unsupported graphs
        raise StudioError(
            f"the model could not be exported to ONNX (opset {opset}): "
            f"{type(error).__name__}: {first_line(error)}"
        ) from None
    model = onnx.load_from_string(buffer.getvalue())
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    check(model)
    try:
        return model.SerializeToString()
    except ValueError as error:  # protobuf's 2 GB limit
        raise StudioError(f"the ONNX model is too large for a single file: {error}") from None


def check(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on ``model``, as a one-line error."""
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # ValidationError and friends
        raise StudioError(f"onnx.checker rejects the exported model: {first_line(error)}") from None


def file_params(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers: the weights the file stores.

    Counted as :func:`studio.core.export.verify.module_params` counts a module: batch-norm
    running statistics and single-element constants (fill values, epsilons) are left out.
    """
    statistics_ = {
        name
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        for name in node.input[3:5]
    }
    total = 0
    for tensor in model.graph.initializer:
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.data_type in _FLOAT_TYPES and size > 1 and tensor.name not in statistics_:
            total += size
    return total


def unaligned_convs(model: onnx.ModelProto, block: int = 8) -> tuple[int, int]:
    """How many convolutions have a number of output channels that is not a multiple of
    ``block``, of how many: ONNX Runtime's CPU layout optimisation (NCHWc) skips those, so
    pruning to such counts gains less speed than its MACs promise."""
    weights = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights]
    odd = sum(1 for n in convs if weights[n.input[1]].dims[0] % block)
    return odd, len(convs)


def session(model: bytes | str, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session (all graph optimisations on). Its threads do not spin
    between runs: spinning threads of one session slow down the next run of another, which
    biases latencies measured side by side."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # failures are raised as errors, not logged too
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # InvalidGraph, NotImplemented...
        raise StudioError(f"ONNX Runtime cannot load the model: {first_line(error)}") from None


def run(sess: Any, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``sess`` on ``x`` (fed to its single input)."""
    return list(sess.run(None, {sess.get_inputs()[0].name: x}))


def latencies_ms(
    sessions: Sequence[Any], x: np.ndarray, budget_s: float = 1.0, warmup: int = 5
) -> list[float]:
    """Median latency in ms of each session on ``x``. Blocks of 10 runs alternate between the
    sessions so that all see the same machine load; at least 20 runs each, more while
    ``budget_s`` lasts (at most 1000)."""
    for sess in sessions:
        for _ in range(warmup):
            run(sess, x)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < 20 or (time.perf_counter() - start < budget_s and len(times[0]) < 1000):
        for sess, bucket in zip(sessions, times, strict=True):
            for _ in range(10):
                began = time.perf_counter()
                run(sess, x)
                bucket.append((time.perf_counter() - began) * 1e3)
    return [statistics.median(bucket) for bucket in times]


# ---- what a file declares -------------------------------------------------------------------


def batch_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    """A dynamic first dim, named ``batch``, for every one of ``names``."""
    return {n: {0: "batch"} for n in names}


def file_names(
    model: LoadedModel,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names: given ones, else an ONNX import's own, else ``input`` and
    ``output`` (``output0``, ``output1``... for a model with several outputs)."""
    names = tuple(inputs or model.input_names or ("input",))
    if outputs is None:
        outputs = model.output_names or None
    if outputs is None:
        with torch.no_grad():
            out = model.module(model.example_input())
        count = len(out) if isinstance(out, tuple | list) else 1
        outputs = ("output",) if count == 1 else tuple(f"output{i}" for i in range(count))
    if len(names) != 1:
        raise StudioError(f"the model takes one input, but {len(names)} input names were given")
    return names, tuple(outputs)


def file_axes(
    model: LoadedModel, inputs: Sequence[str], outputs: Sequence[str]
) -> dict[str, dict[int, str]]:
    """The dynamic dims of a file of ``model`` whose tensors are named ``inputs`` and
    ``outputs``: those its own ONNX file declared (matched by position, so renamed tensors keep
    them), else a dynamic batch on every tensor."""
    given = (*inputs, *outputs)
    own = (*model.input_names, *model.output_names)
    declared = model.onnx_dynamic_axes
    if declared is None or len(own) != len(given):
        return batch_axes(given)
    return {new: dict(declared[old]) for old, new in zip(own, given) if declared.get(old)}


def supported_opset(declared: int | None) -> tuple[int, str | None]:
    """The opset to write a model whose file declared ``declared`` (None: not an ONNX import),
    and a note when it is not that one: the nearest opset torch's exporter writes."""
    if declared is None:
        return DEFAULT_OPSET, None
    opset = min(max(declared, MIN_OPSET), MAX_OPSET)
    if opset == declared:
        return opset, None
    return opset, (
        f"the original file uses opset {declared}, which torch's ONNX exporter does not write "
        f"({MIN_OPSET} to {MAX_OPSET}): written with opset {opset}"
    )


# ---- checking a file against the module -----------------------------------------------------


def probe_inputs(x: np.ndarray, axes: Mapping[int, str]) -> list[np.ndarray]:
    """Inputs besides ``x`` to check a file whose input has the dynamic dims ``axes`` at:
    ``x[:1]`` when the batch (dim 0) is dynamic, and one seeded random input (batch 1 if the
    batch is dynamic) with every other dynamic dim twice ``x``'s (twice, so that a size the
    model needs a multiple of stays one)."""
    probes = [x[:1]] if 0 in axes and len(x) > 1 else []
    others = [i for i in axes if 0 < i < x.ndim]
    if others:
        shape = list(x.shape)
        shape[0] = 1 if 0 in axes else shape[0]
        for i in others:
            shape[i] *= 2
        rng = np.random.default_rng(1)
        probes.append(rng.standard_normal(shape).astype(x.dtype))
    return probes


def verified_onnx(
    module: nn.Module,
    example: torch.Tensor,
    inputs: Sequence[np.ndarray],
    opset: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Axes,
    what: str = "ONNX file",
) -> tuple[bytes, Any, float, float]:
    """``module`` exported at ``example`` (see :func:`onnx_bytes`), checked by running it in
    ONNX Runtime beside the module on every one of ``inputs``: the file's bytes, its session,
    the largest output difference and the largest output magnitude. A StudioError when it
    differs by more than the tolerance (see the module docstring) or fails on an input."""
    data = onnx_bytes(module, example, opset, input_names, output_names, dynamic_axes=dynamic_axes)
    sess = session(data)
    diff, scale = max_abs_diff(partial(torch_outputs, module), partial(run, sess), inputs, what)
    require_match(diff, scale, what)
    return data, sess, diff, scale


def torch_outputs(module: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``module`` on ``x`` as float arrays (tuples and lists flattened)."""
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    items = list(out) if isinstance(out, tuple | list) else [out]
    if not all(isinstance(i, torch.Tensor) for i in items):
        raise StudioError("the model's output is not a tensor or a tuple of tensors")
    return [i.detach().cpu().numpy() for i in items]


def max_abs_diff(
    expected: RunFn, got: RunFn, batches: Sequence[np.ndarray], what: str
) -> tuple[float, float]:
    """The largest absolute difference between two runtimes over ``batches``, and the largest
    output magnitude; a StudioError when shapes differ or a runtime fails."""
    worst, scale = 0.0, 0.0
    for x in batches:
        try:
            want = expected(x)
        except StudioError:
            raise
        except Exception as error:  # the model itself does not run at this size
            raise BatchShapeError(
                f"the model fails on an input of shape {x.shape}, so the exported {what} "
                f"cannot be checked there: {first_line(error)}"
            ) from None
        try:
            have = got(x)
        except Exception as error:  # the exported program fails on this batch
            raise BatchShapeError(
                f"the exported {what} fails on an input of shape {x.shape}: {first_line(error)}"
            ) from None
        if len(have) != len(want):
            raise StudioError(
                f"the exported {what} gives {len(have)} outputs where the model gives {len(want)}"
            )
        for a, b in zip(want, have, strict=True):
            b = np.asarray(b)
            if a.shape != b.shape:
                raise BatchShapeError(
                    f"the exported {what} gives an output of shape {b.shape} where the model "
                    f"gives {a.shape}"
                )
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            diff = np.abs(a64 - b64)
            diff[np.isnan(a64) & np.isnan(b64)] = 0.0
            worst = max(worst, float(np.max(np.nan_to_num(diff, nan=np.inf), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(np.nan_to_num(a64)), initial=0.0)))
    return worst, scale


def require_match(diff: float, scale: float, what: str) -> None:
    """Fail loudly when ``diff`` is beyond the tolerance (see the module docstring)."""
    allowed = TOLERANCE * max(1.0, scale)
    if not diff <= allowed:
        raise StudioError(
            f"the exported {what} does not reproduce the model: largest difference {diff:.3g} "
            f"(allowed {allowed:.2g}); nothing was written"
        )
