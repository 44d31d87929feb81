"""Latency measured on this machine: a model timed in ONNX Runtime or PyTorch (eager, CPU or
CUDA) until its median settles, and a per-layer breakdown from each runtime's profiler.

Runs are timed in blocks of :data:`BLOCK`; the measurement stops once the median of all runs
so far moved less than :data:`STABLE` over the last three blocks (and ``min_runs`` are in), or
when ``max_seconds`` runs out (``stable`` is then False). Besides the median of all runs, the
median of the fastest block (``quiet_ms``): on a machine shared with other work the latency
while nothing else runs, which the lookup-table estimate predicts. Prediction without running
the model is :mod:`studio.core.latency.predict`; target devices are
:mod:`studio.core.latency.devices`.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.latency.types import DEVICES, RUNTIMES, LatencyMeasurement, LayerTime
from studio.core.models.loaded import LoadedModel

BLOCK = 10
STABLE = 0.02
WARMUP = 5


def default_threads() -> int:
    """Threads used when none are given: every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check(runtime: str, batch: int, threads: int | None, device: str) -> int:
    if runtime not in RUNTIMES:
        raise StudioError(f"unknown runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    if device not in DEVICES:
        raise StudioError(f"unknown device {device!r}: choose cpu or cuda")
    if device == "cuda" and runtime != "torch":
        raise StudioError("CUDA latency is measured with --runtime torch")
    if device == "cuda" and not torch.cuda.is_available():
        raise StudioError("CUDA is not available on this machine")
    if not isinstance(batch, int) or batch < 1:
        raise StudioError(f"the batch size must be a positive integer, not {batch!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise StudioError(f"the thread count must be a positive integer, not {threads!r}")
    return threads or default_threads()


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's (process-wide) intra-op thread count set for a while, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def onnx_session(model: LoadedModel, threads: int, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session of ``model`` (exported as :mod:`export_onnx` exports it)."""
    from studio.core.models import onnx_io as export_onnx

    data = export_onnx.onnx_bytes(model.module, model.example_input())
    if profile_prefix is None:
        return export_onnx.session(data, threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]), data


def _runner(
    model: LoadedModel, runtime: str, batch: int, threads: int, device: str
) -> Callable[[], object]:
    x = model.example_input(batch)
    if runtime == "onnxruntime":
        from studio.core.models import onnx_io as export_onnx

        sess = onnx_session(model, threads)
        feed = x.numpy()
        return lambda: export_onnx.run(sess, feed)
    module = model.module
    if device == "cuda":
        import copy

        module, x = copy.deepcopy(module).to("cuda"), x.to("cuda")

        def run_cuda() -> object:
            with torch.inference_mode():
                out = module(x)
            torch.cuda.synchronize()
            return out

        return run_cuda

    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


def measure_latency(
    model: LoadedModel,
    runtime: str = "onnxruntime",
    batch: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    warmup: int = WARMUP,
    min_runs: int = 20,
    max_seconds: float = 3.0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> LatencyMeasurement:
    """Time ``model`` on an input of ``batch`` samples until the median is stable or
    ``max_seconds`` (after warm-up) run out."""
    threads = _check(runtime, batch, threads, device)
    began = time.perf_counter()
    report(progress, 0.0, f"preparing {runtime}")
    with torch_threads(threads):
        run = _runner(model, runtime, batch, threads, device)
        check(cancel)
        for _ in range(max(0, warmup)):
            run()
        check(cancel)
        times: list[float] = []
        medians: list[float] = []
        quiet = float("inf")  # the fastest block's median
        start = time.perf_counter()
        stable = False
        while True:
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
            quiet = min(quiet, statistics.median(times[-BLOCK:]))
            check(cancel)
            medians.append(statistics.median(times))
            spent = time.perf_counter() - start
            report(progress, max(spent / max_seconds, len(times) / max(min_runs, 1) / 4), "timing")
            last = medians[-3:]
            if (
                len(times) >= min_runs
                and len(last) == 3
                and max(last) - min(last) <= STABLE * last[-1]
            ):
                stable = True
                break
            if spent >= max_seconds and len(times) >= min(min_runs, BLOCK):
                break
    p10, p90 = np.percentile(times, [10, 90])
    median = statistics.median(times)
    report(progress, 1.0, "done")
    return LatencyMeasurement(
        median_ms=median,
        p10_ms=float(p10),
        p90_ms=float(p90),
        throughput=batch * 1e3 / median if median > 0 else 0.0,
        runs=len(times),
        runtime=runtime,
        batch=batch,
        threads=threads,
        device=device,
        stable=stable,
        seconds=time.perf_counter() - began,
        quiet_ms=quiet,
    )


def profile_layers(
    model: LoadedModel,
    runtime: str = "onnxruntime",
    batch: int = 1,
    threads: int | None = None,
    device: str = "cpu",
    runs: int = 20,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> list[LayerTime]:
    """Per-layer latency, slowest first: ONNX Runtime's own profiler (fused nodes mapped back
    to the module that leads them), or timed forward hooks on PyTorch's leaf modules."""
    threads = _check(runtime, batch, threads, device)
    with torch_threads(threads):
        if runtime == "onnxruntime":
            per_node = _onnx_profile(model, batch, threads, runs, progress, cancel)
        else:
            per_node = _torch_profile(model, batch, device, runs, progress, cancel)
    total = sum(ms for ms, _ in per_node.values()) or 1.0
    rows = [LayerTime(n, op, ms, ms / total) for n, (ms, op) in per_node.items()]
    report(progress, 1.0, "done")
    return sorted(rows, key=lambda r: -r.ms)


def _torch_profile(
    model: LoadedModel,
    batch: int,
    device: str,
    runs: int,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
) -> dict[str, tuple[float, str]]:
    """Leaf modules timed by pre/post forward hooks (synchronised on CUDA); median per run."""
    import copy

    module, x = model.module, model.example_input(batch)
    if device == "cuda":
        module, x = copy.deepcopy(module).to("cuda"), x.to("cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    leaves = [(n, m) for n, m in module.named_modules() if n and next(m.children(), None) is None]
    started: dict[nn.Module, float] = {}
    spent: dict[str, list[float]] = {n: [] for n, _ in leaves}
    names = {m: n for n, m in leaves}

    def before(mod: nn.Module, _inputs: object) -> None:
        sync()
        started[mod] = time.perf_counter()

    def after(mod: nn.Module, _inputs: object, _out: object) -> None:
        sync()
        spent[names[mod]].append((time.perf_counter() - started[mod]) * 1e3)

    handles = []
    for _, mod in leaves:
        handles += [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]
    try:
        with torch.inference_mode():
            for i in range(runs + 2):
                if i == 2:  # two warm-up runs
                    for bucket in spent.values():
                        bucket.clear()
                module(x)
                check(cancel)
                report(progress, i / (runs + 2), "profiling")
    finally:
        for h in handles:
            h.remove()
    ops = {n: type(m).__name__ for n, m in leaves}
    out: dict[str, tuple[float, str]] = {}
    for name, values in spent.items():
        if values:  # a module called k times per run has k * runs values
            per_run = sum(values) / runs
            out[name] = (per_run if len(values) > runs else statistics.median(values), ops[name])
    return out


def _onnx_profile(
    model: LoadedModel,
    batch: int,
    threads: int,
    runs: int,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
) -> dict[str, tuple[float, str]]:
    import onnx

    from studio.core.models import onnx_io as export_onnx

    with tempfile.TemporaryDirectory(prefix="studio-ortprof-") as folder:
        sess, data = onnx_session(model, threads, str(Path(folder) / "profile"))
        feed = model.example_input(batch).numpy()
        try:
            for i in range(runs + 2):
                export_onnx.run(sess, feed)
                check(cancel)
                report(progress, i / (runs + 2), "profiling")
        finally:
            path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        per_node.setdefault(node, []).append(event.get("dur", 0) / 1e3)
        op_of[node] = event.get("args", {}).get("op_name", "?")
    layer_of = onnx_layer_names(
        onnx.load_from_string(data), {n for n, _ in model.module.named_modules()}
    )
    out: dict[str, tuple[float, str]] = {}
    for node, values in per_node.items():
        values = values[2 * len(values) // (runs + 2) :] or values  # drop warm-up runs
        ms = float(np.mean(values)) if len(values) <= runs else sum(values) / runs
        name = layer_of(node)
        previous = out.get(name, (0.0, op_of[node]))
        out[name] = (previous[0] + ms, previous[1])
    return out


_FUSED_INTO_PRODUCER = {"Relu", "Clip", "BatchNormalization", "Add", "Sigmoid", "HardSwish"}
_LEADERS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def onnx_layer_names(graph_model, modules: set[str]) -> Callable[[str], str]:
    """Map an ONNX Runtime node name (after its fusions: often the fused output's tensor name
    plus ``_nchwc``) to the torch module that leads it, via the exported graph's scope names."""
    producer = {out: node for node in graph_model.graph.node for out in node.output}
    by_name = {node.name: node for node in graph_model.graph.node}

    def module_of(node) -> str | None:
        parts = [p for p in node.name.split("/") if p][:-1]
        path: list[str] = []
        for part in parts:
            if path and part.startswith(path[-1] + "."):
                path[-1] = part
            else:
                path.append(part)
        name = ".".join(path)
        return name if name in modules else None

    def lookup(ort_name: str) -> str:
        key = ort_name.removesuffix("_nchwc")
        node = producer.get(key) or by_name.get(key)
        seen = 0
        while node is not None and seen < 8:
            if node.op_type in _LEADERS or node.op_type not in _FUSED_INTO_PRODUCER:
                return module_of(node) or ort_name
            # fused activations / norms / adds: the time belongs to the layer feeding them
            inputs = [producer.get(i) for i in node.input]
            leaders = [n for n in inputs if n is not None and n.op_type in _LEADERS]
            node = leaders[-1] if leaders else next((n for n in inputs if n is not None), None)
            seen += 1
        return ort_name

    return lookup
