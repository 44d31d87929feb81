"""The channel multiple a runtime runs on its fast path on this machine ("runtime" channels).

Vectorised kernels work on blocks of channels. A structured plan that keeps channel counts off
those blocks pays for whole blocks anyway, and in ONNX Runtime it also adds reorders between
layouts, so fewer MACs need not mean a faster model:

- ONNX Runtime on CPU runs convolutions in its NCHWc layout, whose block is 8 channels with
  AVX2 and 16 with AVX-512 (MLAS). The block is read from the graph ONNX Runtime optimizes
  on this machine (a convolution's weights are padded to whole blocks there), then checked by
  a short measurement: a convolution with half a block fewer channels takes about as long as
  the aligned one.
- PyTorch on CPU runs oneDNN's blocked kernels: 16 channels where the CPU has AVX-512, else 8.
- CUDA: tensor cores take multiples of 8.

Allocation (:mod:`studio.core.plan.allocate`) takes the multiple as a plain number; this module
decides it for the runtime and device at hand.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from studio.core.latency.layout import nchwc_block

CUDA_MULTIPLE = 8
NCHWC_DOMAIN = "com.microsoft.nchwc"
CHOICES = ("runtime", "exact")  # besides a fixed multiple: "8", "16", ...


@dataclass(frozen=True)
class ChannelMultiple:
    """The multiple of channels that ``runtime`` on ``device`` runs on its fast path, and how
    that was found out (one line, for the plan's note and the Planner's tooltip)."""

    multiple: int
    runtime: str
    device: str
    reason: str

    def describe(self) -> str:
        return f"×{self.multiple}: {self.reason}"


def channel_multiple(runtime: str = "onnxruntime", device: str = "cpu") -> ChannelMultiple:
    """The runtime's channel multiple on this machine (cached for the process)."""
    if device.startswith("cuda"):
        return ChannelMultiple(CUDA_MULTIPLE, runtime, device, "CUDA tensor cores: multiples of 8")
    if runtime == "torch":
        return _torch_cpu()
    return _onnx_cpu()


def parse_round_to(text: str | int, runtime: str = "onnxruntime", device: str = "cpu") -> int:
    """``--round-to`` / the Planner's Channels: "runtime" (the detected multiple), "exact" (1)
    or a whole number of channels; a clear error otherwise."""
    from studio.core.errors import StudioError

    value = str(text).strip().lower()
    if value == "runtime":
        return channel_multiple(runtime, device).multiple
    if value == "exact":
        return 1
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 256:
        raise StudioError(
            f"bad channel multiple {text!r}: 'runtime', 'exact' or a whole number from 1 to 256"
        )
    return number


@functools.lru_cache(maxsize=1)
def _torch_cpu() -> ChannelMultiple:
    import torch

    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    wide = "AVX512" in capability
    reason = f"oneDNN's blocked kernels with {capability} take {'16' if wide else '8'} channels"
    return ChannelMultiple(16 if wide else 8, "torch", "cpu", reason)


@functools.lru_cache(maxsize=1)
def _onnx_cpu() -> ChannelMultiple:
    """Read from the machine's cache, else found out (about a second) and cached."""
    import json

    from studio.core.files import write_atomic
    from studio.core.latency.cache import machine_key
    from studio.core.paths import cache_dir

    path = cache_dir() / "latency" / f"channels-{machine_key('onnxruntime', 1)}.json"
    try:
        known = json.loads(path.read_text())
        return ChannelMultiple(int(known["multiple"]), "onnxruntime", "cpu", str(known["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = _detect_onnx_cpu()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"multiple": found.multiple, "reason": found.reason}))
    except OSError:
        pass  # a read-only cache: found out again next time
    return found


def _detect_onnx_cpu() -> ChannelMultiple:
    guess = nchwc_block()
    try:
        block = optimized_block()
    except Exception as exc:  # an ONNX Runtime that cannot save its graph: trust the CPU flags
        reason = f"NCHWc block {guess} from the CPU flags (graph not readable: {exc})"
        return ChannelMultiple(guess, "onnxruntime", "cpu", reason)
    if block is None:
        return ChannelMultiple(
            8, "onnxruntime", "cpu", "ONNX Runtime uses no NCHWc layout here; 8 suits its GEMMs"
        )
    reason = f"ONNX Runtime's NCHWc block on this CPU is {block} channels"
    try:
        aligned, short = block_timing(block)
        fewer, full = block * 4 - block // 2, block * 4
        reason += f" ({fewer} channels measured at {short / aligned:.2f}x the time of {full})"
    except Exception:  # the measurement is a check; the graph already says it
        pass
    return ChannelMultiple(block, "onnxruntime", "cpu", reason)


def optimized_block(channels: int = 24) -> int | None:
    """The NCHWc block ONNX Runtime uses on this machine: a convolution with ``channels``
    outputs (not a multiple of 16) is optimized, and its weights in the NCHWc graph are padded
    to whole blocks. None when the graph has no NCHWc convolution."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.ones((channels, 16, 3, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        [numpy_helper.from_array(weight, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    with tempfile.TemporaryDirectory(prefix="studio-block-") as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.intra_op_num_threads = 1
        options.log_severity_level = 3  # not the warning that the saved graph is CPU-specific
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(Path(folder) / "optimized.onnx"))
    shapes = {t.name: list(t.dims) for t in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.domain == NCHWC_DOMAIN and node.op_type == "Conv" and node.input[1] in shapes:
            padded = shapes[node.input[1]][0]
            for block in (16, 8, 4):
                if padded % block == 0 and padded - channels < block:
                    return block
            return None
    return None


def block_timing(block: int, threads: int = 1) -> tuple[float, float]:
    """Kernel time (ms) of a 3x3 convolution with 4 blocks of channels and of one with half a
    block fewer: on the NCHWc path both run the same number of blocks."""
    from studio.core.latency.micro import LayerConfig, time_onnx

    cfg = LayerConfig("conv", 3, 1, 28, 28, 1)
    full = block * 4
    short = full - block // 2
    aligned = min(time_onnx(cfg, full, full, threads, runs=12) for _ in range(2))
    fewer = min(time_onnx(cfg, full, short, threads, runs=12) for _ in range(2))
    return aligned, fewer
