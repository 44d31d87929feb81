"""Roofline estimate of a model, or of any plan of it, on a target device (no pruning run).

:class:`DeviceEstimator` traces the model once (per-layer MACs, weights, input and output
activations) and then estimates any plan in microseconds: structured plans shrink each
layer by the kept fractions of its output and input channels (as :class:`CostModel` counts
them); unstructured and 2:4 plans cut MACs and weight traffic only on devices that exploit
that sparsity (2:4 weights keep 2 bits of index per kept value); removed blocks take their
layers away. :func:`machine_profile` turns this machine's micro-benchmarks into a profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from studio.core.latency.devices import BYTES, DeviceProfile
from studio.core.latency.types import DeviceEstimate, LayerEstimate
from studio.core.models.inventory import layer_rows, trace_layers
from studio.core.models.loaded import LoadedModel
from studio.core.plan.costs import CostModel
from studio.core.plan.plan import PruningPlan

NM_INDEX_BITS = 2  # metadata per kept value of a 2:4 weight
INDEX_BYTES = 1.0  # per kept weight of an unstructured-sparse weight (relative index)


@dataclass(frozen=True)
class _Row:
    name: str
    op: str  # conv, dwconv, linear, other
    type: str
    macs: float  # per sample
    weights: float
    inputs: float  # activations per sample
    outputs: float
    depthwise: bool


class DeviceEstimator:
    """Estimates one model's plans on any device profile."""

    def __init__(self, model: LoadedModel, rows: list[_Row], batch: int) -> None:
        self.model = model
        self.rows = rows
        self.batch = batch
        self._cost: CostModel | None = None

    @classmethod
    def build(
        cls, model: LoadedModel, batch: int = 1, cost: CostModel | None = None
    ) -> DeviceEstimator:
        module = model.module
        inputs: dict[str, tuple[int, ...]] = {}
        outputs, macs = trace_layers(module, model.example_input(), inputs)
        rows_of = layer_rows(module, macs)
        rows = []
        for name, mod in rows_of:
            known = name in inputs and name in outputs
            n_in = math.prod(inputs[name]) if known else 0
            n_out = math.prod(outputs[name]) if known else 0
            weights = sum(p.numel() for p in mod.parameters(recurse=False))
            if not macs.get(name) and not weights:
                continue
            groups = getattr(mod, "groups", 1)
            depthwise = isinstance(mod, nn.Conv2d) and groups > 1 and groups == mod.in_channels
            op = (
                "dwconv"
                if depthwise
                else "conv"
                if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d)
                else "linear"
                if isinstance(mod, nn.Linear)
                else "other"
            )
            rows.append(
                _Row(
                    name, op, type(mod).__name__, macs.get(name, 0), weights, n_in, n_out, depthwise
                )
            )
        self = cls(model, rows, batch)
        self._cost = cost if cost is not None and cost.method == "structured" else None
        return self

    def _structured(self, plan: PruningPlan) -> tuple[np.ndarray, np.ndarray]:
        """Kept fractions of output and input channels of each row after ``plan``."""
        if self._cost is None:
            self._cost = CostModel.build(self.model, "structured")
        cost = self._cost
        r = cost.ratio_vector({n: plan.ratio(n) for n in cost.names})
        outs, ins = cost.channels_vector(r)
        outs0, ins0 = cost.channels_vector(np.zeros(len(cost.names)))
        where = {n: i for i, n in enumerate(cost.rows)}
        fo, fi = np.ones(len(self.rows)), np.ones(len(self.rows))
        for i, row in enumerate(self.rows):
            j = where.get(row.name)
            if j is not None:
                fo[i] = outs[j] / max(outs0[j], 1.0)
                fi[i] = fo[i] if row.depthwise or row.op == "other" else ins[j] / max(ins0[j], 1.0)
        return fo, fi

    def estimate(
        self, device: DeviceProfile, plan: PruningPlan | None = None, dtype: str | None = None
    ) -> DeviceEstimate:
        """Estimated latency and energy of the model (or ``plan`` of it) on ``device``."""
        dtype = dtype or device.default_dtype
        peak = device.peak(dtype)
        size = BYTES[dtype]
        n = len(self.rows)
        fo, fi = np.ones(n), np.ones(n)
        density = np.ones(n)  # fraction of MACs and weights the device executes / moves
        weight_bytes = np.array([r.weights * size for r in self.rows], float)
        used = "dense"
        gone = np.zeros(n, bool)
        if plan is not None and plan.method == "structured":
            fo, fi = self._structured(plan)
        elif plan is not None and plan.method in ("unstructured", "nm"):
            pattern = "2:4" if plan.method == "nm" else "unstructured"
            if device.exploits(pattern):
                used = pattern
                for i, row in enumerate(self.rows):
                    ratio = plan.ratio(row.name)
                    if ratio <= 0:
                        continue
                    kept = 0.5 if plan.method == "nm" else 1.0 - ratio
                    density[i] = kept
                    extra = NM_INDEX_BITS / 8 if plan.method == "nm" else INDEX_BYTES
                    weight_bytes[i] = row.weights * kept * (size + extra)
        elif plan is not None and plan.method == "blocks":
            removed = [b for b, v in plan.ratios.items() if v >= 0.5 and b not in plan.ignored]
            gone = np.array([any(r.name.startswith(b + ".") for b in removed) for r in self.rows])
        dense_w = np.array([r.op in ("conv", "linear") for r in self.rows])
        shrink = np.where(dense_w, fo * fi, fo)
        if plan is not None and plan.method == "structured":
            weight_bytes = weight_bytes * shrink
        on_chip = float(weight_bytes.sum()) <= device.on_chip_bytes
        b = self.batch
        layers = []
        pj_mac = device.energy_pj_per_mac.get(dtype, 0.0)
        for i, row in enumerate(self.rows):
            if gone[i]:
                continue
            macs = row.macs * b * shrink[i] * density[i]
            moved = (0.0 if on_chip else weight_bytes[i]) + size * b * (
                row.inputs * fi[i] + row.outputs * fo[i]
            )
            compute = 2.0 * macs / (peak * device.efficiency_of(row.op))
            memory = moved / device.memory_bandwidth
            ms = max(compute, memory) * 1e3 + device.overhead_us * 1e-3
            energy = (macs * pj_mac + moved * device.energy_pj_per_byte) * 1e-9  # pJ -> mJ
            bound = "compute" if compute >= memory else "memory"
            layers.append(LayerEstimate(row.name, row.type, macs, moved, ms, bound, energy))
        return DeviceEstimate(
            device=device.name,
            dtype=dtype,
            batch=b,
            total_ms=sum(layer.ms for layer in layers),
            energy_mj=sum(layer.energy_mj for layer in layers),
            macs=sum(layer.macs for layer in layers),
            bytes=sum(layer.bytes for layer in layers),
            layers=tuple(layers),
            sparsity_used=used,
            source=device.source,
        )


def machine_profile(predictor: object, bandwidth: float | None = None) -> DeviceProfile:
    """This machine as a profile: effective fp32 ops/s per layer kind from the predictor's
    micro-benchmarks (the best measured point is the peak, the median its efficiency) and
    the bandwidth of a large array copy."""
    from studio.core.latency.micro import memory_bandwidth

    rates: dict[str, list[float]] = {}
    for layer in predictor.layers:  # type: ignore[attr-defined]
        cfg = layer.cfg
        for xs, ys, table in layer.grids.values():
            for a, x in enumerate(xs):
                for c, y in enumerate(ys):
                    ms = float(table[a, c])
                    if ms <= 0:
                        continue
                    if cfg.op == "linear":
                        macs = cfg.rows * x * y
                    else:
                        per = cfg.kernel**2 * (1 if cfg.op == "dwconv" else x)
                        out_hw = -(-cfg.height // cfg.stride) * -(-cfg.width // cfg.stride)
                        macs = cfg.rows * y * per * out_hw
                    rates.setdefault(cfg.op, []).append(2 * macs / (ms * 1e-3))
    if not rates:
        raise ValueError("the predictor holds no measurements")
    peak = max(max(v) for v in rates.values())
    efficiency = {op: float(min(1.0, np.median(v) / peak)) for op, v in rates.items()}
    efficiency["other"] = min(efficiency.values())
    runtime = getattr(predictor, "runtime", "?")
    threads = getattr(predictor, "threads", 0)
    return DeviceProfile(
        name="this-machine",
        title=f"this machine ({runtime}, {threads} thread(s), calibrated)",
        source="measured: micro-benchmarks of this model's layers and a 64 MiB array copy",
        peak_ops={"fp32": peak},
        memory_bandwidth=bandwidth or memory_bandwidth(),
        efficiency=efficiency,
        overhead_us=0.0,
    )
