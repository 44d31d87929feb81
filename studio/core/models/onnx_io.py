"""Writing a torch module as ONNX, counting what the file holds, and timing it in ONNX Runtime.

The graph is written by torch's TorchScript-based exporter (``dynamo=False``: the dynamo exporter
needs onnxscript, which the studio does not ship) in a way that keeps it one-to-one with the
module, so that its parameter count can be checked against the model's:

- batch norms are not folded into the convolutions before them (``TrainingMode.PRESERVE`` on a
  module in eval mode): ONNX Runtime folds them itself when it loads the file, so nothing is lost;
- initializers with equal values are not merged (``keep_initializers_as_inputs``; the exporter
  otherwise shares the all-ones/all-zeros tensors of freshly initialised norms), and are then
  taken out of the graph's inputs again so that runtimes may constant-fold them.

The file is a single protobuf (no external data), so models are limited to 2 GB.
"""

from __future__ import annotations

import io
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from studio.core.errors import StudioError, first_line

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20  # ONNX Runtime's quantizer needs 11+; torch's exporter stops at 20
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
_FLOAT_TYPES.add(onnx.TensorProto.BFLOAT16)


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
) -> bytes:
    """``module`` (in eval mode) as a serialized ONNX model, checked by ``onnx.checker``."""
    check_opset(opset)
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
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
