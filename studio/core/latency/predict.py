"""Latency of a pruning plan predicted for this machine without building the pruned model.

A per-layer lookup table (as NetAdapt and HALP build them) holds micro-benchmarked times of
each convolution and linear configuration the model has (:mod:`studio.core.latency.micro`) at a
few channel counts per dimension, in the layout regime ONNX Runtime really runs it in
(:mod:`studio.core.latency.grid`): an NCHWc convolution costs the same at every count that pads
to the same blocks, a plain NCHW one is interpolated bilinearly between measured counts. Each
micro-benchmark is the fastest of :data:`PASSES` passes spread over the build. What the layers'
layouts add between them, the reorders into and out of NCHWc and the additions and activations
that no longer fuse into a convolution, is simulated on the unpruned model's graph for the
plan's channel counts (:mod:`studio.core.latency.layout`, checked against the graphs ONNX Runtime
builds) and timed as nodes. A per-model fit (:mod:`studio.core.latency.fit`) times the unpruned
model and 47 pruned variants (14 aligned to the runtime's block) in interleaved passes (20 s
at least), keeps each one's fastest pass (its latency on the undisturbed machine: this shared
box switches between speed states
every 0.5-2 s, and the median of all runs depends on how many fell into each), and fits one
scale per layer regime (plain, NCHWc, depthwise, linear: the micro-benchmarks of a lone layer
miss what a chain of them shares in cache), one for the extra nodes and a constant. Table and
fit are cached on disk per machine, runtime and thread count, so a second build only traces the
model.

benchmarks/latency_prediction.py on the shared 2-core development box (AVX2, 1 thread, 30
random structured plans and 30 aligned to the NCHWc block), share within +-10 % of the quiet
latency (the fastest pass's median), random / aligned: demo batch 1 100 / 100 %, batch 32
93 / 100 % (100 / 100 % anchored to the unpruned model measured in the same run, as the
Latency tab and ``studio latency --predict`` anchor), mobilenetv2 batch 1 and 32 100 / 100 %;
worst +11.9 %. Against the median of all runs 0-30 %, as the machine's load went.
predict(): 0.24-0.50 ms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report, sub_progress
from studio.core.latency.cache import (
    cache_path,
    read_cache,
    write_cache,
)
from studio.core.latency.fit import fit_model
from studio.core.latency.grid import BLOCK, bilinear, coordinates, linear, pad, regime
from studio.core.latency.grid import grids as grids_of
from studio.core.latency.layout import LayoutGraph
from studio.core.latency.measure import _check, torch_threads
from studio.core.latency.micro import NODE_MODELS, LayerConfig, time_nodes, time_onnx, time_torch
from studio.core.latency.types import LayerTime, PredictedLatency
from studio.core.models.inventory import trace_layers
from studio.core.models.loaded import LoadedModel
from studio.core.plan.costs import CostModel
from studio.core.plan.plan import PruningPlan

FIT_VERSION = 11  # the fit cached: 8 a scale per layer regime, 9 wider variants, 10 rounded,
# 11 rounded to the runtime's block, 14 aligned variants
FLOOR = 0.2  # a prediction is at least this fraction of the scaled table times
PASSES = 3  # each micro-benchmark is the fastest of this many passes spread over the build
PASS_RUNS = 12  # runs per micro-benchmark and pass


@dataclass
class _Layer:
    name: str
    op: str  # module type
    cfg: LayerConfig
    c_in: int
    c_out: int
    in_row: int  # index into CostModel.rows, -1 when no plan changes this side
    out_row: int
    # layout regime -> (input channels, output channels measured, ms at each pair)
    grids: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    # the grids as Python lists (scalar interpolation in Python is faster than in numpy)
    fast: dict[str, tuple[list[float], list[float], list[list[float]]]] = field(
        default_factory=dict
    )

    def points(self) -> list[tuple[int, int]]:
        return [(int(x), int(y)) for xs, ys, _ in self.grids.values() for x in xs for y in ys]


class LatencyPredictor:
    """Predicted latency of any plan of one model, at one runtime, batch and thread count."""

    def __init__(
        self, cost: CostModel, layers: list[_Layer], runtime: str, batch: int, threads: int
    ) -> None:
        self.cost = cost
        self.layers = layers
        self.runtime, self.batch, self.threads = runtime, batch, threads
        # the fit's terms: one per layer regime (operator and layout kernel), then the extra
        # nodes (reorders, unfused additions and activations), then a constant
        self.groups = sorted({f"{x.cfg.op}-{kind}" for x in layers for kind in x.grids})
        self._group = {g: i for i, g in enumerate(self.groups)}
        self.coef = np.array([1.0] * len(self.groups) + [1.0, 0.0])
        self.layout: LayoutGraph | None = None  # ONNX Runtime: the unpruned model's graph
        self.nodes: dict[str, tuple[list[float], list[float]]] = {}  # op -> elements, ms
        self.fit_error = 0.0  # largest relative error of the fit on its measured variants
        self.measured_ms: float | None = None  # the unpruned model measured during the fit
        self.calibrated_points = 0  # micro-benchmarks run by this build (0: all from cache)
        self.table: dict[str, float] = {}
        self.anchor = 1.0  # scale set by anchor_to() from a fresh measurement
        self.original_ms = 0.0

    # ---- building ----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: LoadedModel,
        runtime: str = "onnxruntime",
        batch: int = 1,
        threads: int | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
        recalibrate: bool = False,
        fit: bool = True,
        cost: CostModel | None = None,
    ) -> LatencyPredictor:
        """Trace ``model``, micro-benchmark the layer configurations missing from the cache
        (all of them with ``recalibrate``), and fit the model's overhead (``fit``)."""
        threads = _check(runtime, batch, threads, "cpu")
        report(progress, 0.0, "tracing the model")
        cost = cost if cost is not None and cost.method == "structured" else None
        cost = cost or CostModel.build(model, "structured")
        layers = _layers(model, cost, batch, runtime)
        if not layers:
            raise StudioError(f"{model.name} has no convolution or linear layer to predict")
        self = cls(cost, layers, runtime, batch, threads)
        if runtime == "onnxruntime":
            from studio.core.models import onnx_io as export_onnx

            data = export_onnx.onnx_bytes(model.module, model.example_input())
            self.layout = LayoutGraph.from_onnx(data)
        path = cache_path(runtime, threads)
        cached = read_cache(path)
        known: dict[str, float] = {} if recalibrate else dict(cached["table"])
        configs: dict[str, tuple] = {
            layer.cfg.key(x, y): (layer.cfg, x, y) for layer in layers for x, y in layer.points()
        }
        configs.update(self._node_configs())
        todo = sorted(k for k in configs if not _known(k, configs[k], known))
        timer = time_onnx if runtime == "onnxruntime" else time_torch
        measured: dict[str, float] = {}
        step = sub_progress(progress, 0.02, 0.6 if fit else 1.0)
        with torch_threads(threads):
            # passes over all configurations: a burst of load from other processes slows
            # one pass of a configuration, and the fastest pass is kept
            for n in range(PASSES * len(todo)):
                check(cancel)
                key = todo[n % len(todo)]
                if key.startswith("node|"):
                    for op, ms in time_nodes(configs[key][0], configs[key][1], threads).items():
                        name = _node_key(op, configs[key][1])
                        measured[name] = min(measured.get(name, ms), ms)
                else:
                    cfg, c_in, c_out = configs[key]
                    ms = timer(cfg, c_in, c_out, threads, PASS_RUNS)
                    measured[key] = min(measured.get(key, ms), ms)
                report(step, (n + 1) / (PASSES * len(todo)), f"micro-benchmarks {n + 1}")
        known.update(measured)
        self.calibrated_points = len([k for k in todo if not k.startswith("node|")])
        for layer in layers:
            for kind, (xs, ys, _) in list(layer.grids.items()):
                table = np.array([[known[layer.cfg.key(int(x), int(y))] for y in ys] for x in xs])
                layer.grids[kind] = (xs, ys, table)
                layer.fast[kind] = (xs.tolist(), ys.tolist(), table.tolist())
        sizes = sorted({e for _, e in self._node_configs().values()})
        for op in (op for pair in NODE_MODELS.values() for op in pair):
            self.nodes[op] = ([float(e) for e in sizes], [known[_node_key(op, e)] for e in sizes])
        self.table = {k: known[k] for k in configs if k in known}
        fit_key = f"{model.fingerprint()}|b{batch}|fit{FIT_VERSION}"
        fits: dict[str, dict] = {}
        if fit:
            entry = None if recalibrate else cached["fits"].get(fit_key)
            if entry is None or entry.get("groups") != self.groups:  # a fit of other regimes
                entry = fit_model(self, model, sub_progress(progress, 0.6, 1.0), cancel)
                entry["groups"] = self.groups
                fits[fit_key] = entry
            self.coef = np.array(entry["coef"], float)
            self.fit_error = float(entry.get("error", 0.0))
            self.measured_ms = entry.get("measured_ms")
        if measured or fits:
            write_cache(path, measured, fits)
        self.original_ms = self.predict_ms(self._zero())
        report(progress, 1.0, "done")
        return self

    def _node_configs(self) -> dict[str, tuple[str, int]]:
        """The extra nodes' micro-benchmarks: each node model at powers of 2 of elements up
        to the largest tensor a layer of this model writes (channels padded to blocks)."""
        if self.layout is None:
            return {}
        widest = max(max(pad(layer.c_in), pad(layer.c_out)) for layer in self.layers)
        top = self.batch * widest * max(self.layout.spatial.values(), default=1.0)
        sizes = [2**k for k in range(6, max(7, int(np.ceil(np.log2(top))) + 1))]
        return {f"node|{m}|e{e}": (m, e) for m in NODE_MODELS for e in sizes}

    # ---- predicting --------------------------------------------------------------------

    def _zero(self) -> np.ndarray:
        return np.zeros(len(self.cost.names))

    def _features(self, r: np.ndarray) -> tuple[np.ndarray, list[int], float]:
        """Table time of every layer after ``r``, the index of its regime in :attr:`groups`,
        and the time of the nodes that the layers' layouts add (reorders, additions and
        activations that no longer fuse)."""
        out_arr, in_arr = self.cost.channels_vector(r)
        outs, ins = out_arr.tolist(), in_arr.tolist()
        times, groups = [], []
        onnx = self.runtime == "onnxruntime"
        channels: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            c_out = outs[layer.out_row] if layer.out_row >= 0 else layer.c_out
            c_in = ins[layer.in_row] if layer.in_row >= 0 else layer.c_in
            op = layer.cfg.op
            kind = regime(op, c_in, c_out) if onnx else "t"
            if kind not in layer.fast:
                kind = next(iter(layer.fast))
            xs, ys, table = layer.fast[kind]
            groups.append(self._group[f"{op}-{kind}"])
            x, y = coordinates(op, kind, c_in, c_out) if onnx else (c_in, c_out)
            times.append(bilinear(xs, ys, table, 0.0 if op == "dwconv" else x, y))
            channels[layer.name] = (int(c_out), int(c_out)) if op == "dwconv" else (c_in, c_out)
        extra = 0.0
        if self.layout is not None:
            for op, elements in self.layout.simulate(channels, BLOCK).extra:
                xs, ys = self.nodes[op]
                extra += linear(xs, ys, elements * self.batch)
        return np.array(times), groups, extra

    def fit_features(self, r: np.ndarray) -> np.ndarray:
        """The fit's terms for ratios ``r``: table time per regime, extra nodes, 1."""
        times, groups, extra = self._features(r)
        sums = np.bincount(groups, weights=times, minlength=len(self.groups))
        return np.concatenate([sums, [extra, 1.0]])

    def _per_layer(self, r: np.ndarray) -> tuple[np.ndarray, float]:
        times, groups, extra = self._features(r)
        return self.coef[groups] * times, float(self.coef[-2]) * extra

    def predict_ms(self, r: np.ndarray) -> float:
        """Total predicted ms for ratios in the cost model's target order (allocator use)."""
        per_layer, extra = self._per_layer(r)
        layers = float(per_layer.sum())
        return float(self.anchor * max(layers + extra + float(self.coef[-1]), FLOOR * layers))

    def predict(self, plan: PruningPlan | Mapping[str, float]) -> PredictedLatency:
        """Predicted latency of ``plan`` (a plan, or structured ratios by target name)."""
        note = ""
        if isinstance(plan, PruningPlan):
            if plan.method in ("unstructured", "nm"):
                r, note = self._zero(), f"{self.runtime} runs zeroed weights densely: no gain"
            elif plan.method == "blocks":
                return self._predict_blocks(plan)
            else:
                r = self.cost.ratio_vector({n: plan.ratio(n) for n in self.cost.names})
        else:
            r = self.cost.ratio_vector(plan)
        per_layer, extra = self._per_layer(r)
        return self._result(per_layer, extra + float(self.coef[-1]), note)

    def _predict_blocks(self, plan: PruningPlan) -> PredictedLatency:
        per_layer, extra = self._per_layer(self._zero())
        gone = [n for n, v in plan.ratios.items() if v >= 0.5 and n not in plan.ignored]
        keep = np.array(
            [not any(layer.name.startswith(g + ".") for g in gone) for layer in self.layers]
        )
        note = "removed blocks: their layers' times taken out (adds and shortcuts kept)"
        return self._result(np.where(keep, per_layer, 0.0), extra + float(self.coef[-1]), note)

    def _result(self, per_layer: np.ndarray, overhead: float, note: str) -> PredictedLatency:
        """``overhead``: what no single layer accounts for (extra nodes, the fit's constant)."""
        overhead = max(overhead, (FLOOR - 1.0) * float(per_layer.sum())) * self.anchor
        per_layer = per_layer * self.anchor
        total = float(per_layer.sum()) + overhead
        denom = float(per_layer.sum()) or 1.0
        rows = sorted(
            (
                LayerTime(layer.name, layer.op, float(ms), float(ms) / denom, "estimated")
                for layer, ms in zip(self.layers, per_layer)
            ),
            key=lambda t: -t.ms,
        )
        return PredictedLatency(
            total, tuple(rows), self.runtime, self.batch, self.threads, overhead, note
        )

    def anchor_to(self, measured_ms: float) -> None:
        """Scale every prediction so that the unpruned model's equals ``measured_ms``, a fresh
        measurement (same runtime, batch and threads): on a machine whose load changes, the
        table and fit keep the ratios between plans, the fresh measurement the level."""
        if measured_ms <= 0:
            raise StudioError(f"a measured latency is positive, not {measured_ms!r}")
        self.anchor = 1.0
        self.anchor = measured_ms / self.predict_ms(self._zero())
        self.original_ms = measured_ms

    def fraction(self, plan: PruningPlan | Mapping[str, float]) -> float:
        """Predicted latency of ``plan`` as a fraction of the unpruned model's."""
        return self.predict(plan).total_ms / self.original_ms if self.original_ms else 1.0


def _node_key(op: str, elements: int) -> str:
    return f"node|{op}|e{elements}"


def _known(key: str, config: tuple, known: Mapping[str, float]) -> bool:
    """Whether the cache holds ``key``'s micro-benchmark: a layer configuration's own key, or
    for a node model (timed as a pair of nodes) the key of each of its nodes."""
    if not key.startswith("node|"):
        return key in known
    model, elements = config
    return all(_node_key(op, elements) in known for op in NODE_MODELS[model])


def _layers(model: LoadedModel, cost: CostModel, batch: int, runtime: str) -> list[_Layer]:
    """Every Conv2d and Linear with its configuration, channels and the rows that change them."""
    module = model.module
    inputs: dict[str, tuple[int, ...]] = {}
    outputs, _ = trace_layers(module, model.example_input(), inputs)
    shapes = {
        name: (inputs[name], outputs[name])
        for name, mod in module.named_modules()
        if isinstance(mod, nn.Conv2d | nn.Linear) and name in inputs and name in outputs
    }
    rows = {n: i for i, n in enumerate(cost.rows)}
    r_max = np.full(len(cost.names), 0.99)
    outs, ins = cost.channels_vector(r_max) if cost.rows else (np.zeros(0), np.zeros(0))
    layers = []
    for name, mod in module.named_modules():
        if name not in shapes:
            continue
        (shape_in, shape_out) = shapes[name]
        if isinstance(mod, nn.Linear):
            n = batch * int(np.prod(shape_in[1:-1])) if len(shape_in) > 2 else batch
            cfg = LayerConfig("linear", 1, 1, 1, 1, n)
            c_in, c_out = mod.in_features, mod.out_features
        else:
            k, s = mod.kernel_size[0], mod.stride[0]
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels
            if mod.groups > 1 and not depthwise:
                continue  # grouped convolutions are left to the model's fit
            op = "dwconv" if depthwise else "conv"
            cfg = LayerConfig(op, int(k), int(s), int(shape_in[2]), int(shape_in[3]), batch)
            c_in, c_out = mod.in_channels, mod.out_channels
        i = rows.get(name, -1)
        out_row = i if i >= 0 and outs[i] < c_out else -1
        in_row = i if i >= 0 and ins[i] < c_in else -1
        if runtime == "onnxruntime":
            pairs = grids_of(cfg.op, c_in, c_out, in_row < 0, out_row < 0)
        else:  # PyTorch's kernels have no layout regimes: one grid over the raw counts
            pairs = {"t": grids_of("linear", c_in, c_out, in_row < 0, out_row < 0)["l"]}
            if cfg.op == "dwconv":
                pairs = {"t": (np.array([0.0]), pairs["t"][1])}
        grids = {k: (xs, ys, np.zeros(0)) for k, (xs, ys) in pairs.items()}
        layers.append(_Layer(name, type(mod).__name__, cfg, c_in, c_out, in_row, out_row, grids))
    return layers
