"""Micro-benchmarks of single layers for the latency lookup table.

A layer configuration (:class:`LayerConfig`: operator, kernel, stride, input size, batch) is
timed at a few channel counts. In ONNX Runtime the layer is a one-node model (Conv + Relu, or
Gemm) and its time is the kernel time ONNX Runtime's profiler gives the node (the reorders
into and out of the NCHWc layout that a one-layer model needs, but a chain of convolutions
does not, are left out: :func:`time_nodes` times them, and the additions and activations that
do not fuse, on their own); in PyTorch it is the layer's forward pass, timed.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

RUNS = 24
NODE_MODELS = {"reorder": ("ReorderInput", "ReorderOutput"), "elementwise": ("Add", "Relu")}


@dataclass(frozen=True)
class LayerConfig:
    """What a layer's latency depends on besides its channel counts."""

    op: str  # "conv", "dwconv" (depthwise) or "linear"
    kernel: int
    stride: int
    height: int  # input feature map (linear: 1)
    width: int
    rows: int  # batch (linear: batch times the leading token dimensions)

    def key(self, c_in: int, c_out: int) -> str:
        return (
            f"{self.op}|k{self.kernel}|s{self.stride}|{self.height}x{self.width}|"
            f"n{self.rows}|{c_in}>{c_out}"
        )


def _onnx_model(cfg: LayerConfig, c_in: int, c_out: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if cfg.op == "linear":
        shape: list[int | str] = [cfg.rows, c_in]
        w = numpy_helper.from_array(rng.standard_normal((c_out, c_in), np.float32), "W")
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
    else:
        groups = c_out if cfg.op == "dwconv" else 1
        c_in = c_out if cfg.op == "dwconv" else c_in
        shape = [cfg.rows, c_in, cfg.height, cfg.width]
        k = cfg.kernel
        w = numpy_helper.from_array(
            rng.standard_normal((c_out, c_in // groups, k, k), np.float32), "W"
        )
        node = helper.make_node(
            "Conv",
            ["x", "W", "B"],
            ["y"],
            kernel_shape=[k, k],
            strides=[cfg.stride] * 2,
            pads=[k // 2] * 4,
            group=groups,
        )
    b = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "B")
    relu = helper.make_node("Relu", ["y"], ["z"])
    graph = helper.make_graph(
        [node, relu],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _input(cfg: LayerConfig, c_in: int, c_out: int) -> np.ndarray:
    channels = c_out if cfg.op == "dwconv" else c_in
    shape = (
        (cfg.rows, channels) if cfg.op == "linear" else (cfg.rows, channels, cfg.height, cfg.width)
    )
    return np.random.default_rng(1).standard_normal(shape, np.float32)


def time_onnx(cfg: LayerConfig, c_in: int, c_out: int, threads: int, runs: int = RUNS) -> float:
    """Kernel time in ms of the layer's main node in ONNX Runtime (trimmed mean of ``runs``)."""
    events = _profile(_onnx_model(cfg, c_in, c_out), _input(cfg, c_in, c_out), threads, runs)
    # the main node of each run (Conv/Gemm with the Relu fused, or both when not fused)
    values = _per_run(events, runs)
    return _trimmed(values) if values else 0.0


def time_nodes(model: str, elements: int, threads: int, runs: int = RUNS) -> dict[str, float]:
    """Kernel time in ms of each node of ``model`` (:data:`NODE_MODELS`: a ReorderInput into
    NCHWc and a ReorderOutput back, or an Add and a Relu) on a tensor of ``elements`` floats."""
    from onnx import TensorProto, helper

    if model == "reorder":
        domain = "com.microsoft.nchwc"
        nodes = [
            helper.make_node("ReorderInput", ["x"], ["r"], domain=domain),
            helper.make_node("ReorderOutput", ["r"], ["z"], domain=domain, channels=16),
        ]
    else:
        nodes = [helper.make_node("Add", ["x", "x"], ["s"]), helper.make_node("Relu", ["s"], ["z"])]
    graph = helper.make_graph(
        nodes,
        model,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft.nchwc", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    x = np.random.default_rng(1).standard_normal((1, 16, 1, max(1, elements // 16)), np.float32)
    events = _profile(proto.SerializeToString(), x, threads, runs, optimize=False)
    times: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "")
            times.setdefault(op, []).append(event.get("dur", 0) / 1e3)
    return {op: _trimmed(times.get(op, [0.0])[-runs:]) for op in NODE_MODELS[model]}


def _profile(
    model: bytes, x: np.ndarray, threads: int, runs: int, optimize: bool = True
) -> list[dict]:
    """ONNX Runtime's profiler events of ``runs`` runs (after 3 warm-up runs) of ``model``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="studio-micro-") as folder:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4
        options.intra_op_num_threads = threads
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "micro")
        sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 3):
            sess.run(None, {"x": x})
        return json.loads(Path(sess.end_profiling()).read_text())


def _per_run(events: list[dict], runs: int) -> list[float]:
    """Sum of non-reorder node kernel times of each of the last ``runs`` runs."""
    totals: list[float] = []
    current = 0.0
    for event in events:
        cat, name = event.get("cat"), event.get("name", "")
        if cat == "Session" and name == "model_run":
            totals.append(current)
            current = 0.0
        elif cat == "Node" and name.endswith("_kernel_time"):
            if "Reorder" not in event.get("args", {}).get("op_name", ""):
                current += event.get("dur", 0) / 1e3
    return totals[-runs:]


def _trimmed(values: list[float]) -> float:
    """Mean of the middle half: robust like a median, finer than the profiler's microsecond."""
    ordered = sorted(values)
    quarter = len(ordered) // 4
    middle = ordered[quarter : len(ordered) - quarter] or ordered
    return float(np.mean(middle))


def time_torch(cfg: LayerConfig, c_in: int, c_out: int, threads: int, runs: int = RUNS) -> float:
    """Median forward time in ms of the layer (with its ReLU) in PyTorch eager on the CPU."""
    if cfg.op == "linear":
        layer: nn.Module = nn.Linear(c_in, c_out)
    else:
        groups = c_out if cfg.op == "dwconv" else 1
        c_in = c_out if cfg.op == "dwconv" else c_in
        layer = nn.Conv2d(c_in, c_out, cfg.kernel, cfg.stride, cfg.kernel // 2, groups=groups)
    module = nn.Sequential(layer, nn.ReLU()).eval()
    x = torch.from_numpy(_input(cfg, c_in, c_out))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(3):
                module(x)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                module(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def memory_bandwidth(seconds: float = 0.3) -> float:
    """Bytes per second of a large array copy on this machine (read + write counted)."""
    src = np.ones(16 * 2**20, np.float32)  # 64 MiB: far beyond the caches
    dst = np.empty_like(src)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or best == float("inf"):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best
