"""Result types of latency work. Every value says whether it was ``measured`` on this machine
or ``estimated`` (predicted by the lookup table, or by a device profile's roofline)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MEASURED, ESTIMATED = "measured", "estimated"
RUNTIMES = ("onnxruntime", "torch")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class LatencyMeasurement:
    """Latency of one model measured on this machine: statistics over ``runs`` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    throughput: float  # samples per second at the median (batch / median)
    runs: int
    runtime: str
    batch: int
    threads: int
    device: str = "cpu"
    stable: bool = True  # False: the time budget ran out before the median settled
    seconds: float = 0.0  # wall time the measurement took
    # the median of the fastest block of runs: the latency on the undisturbed machine, which
    # the lookup-table estimate predicts (0: not measured in blocks)
    quiet_ms: float = 0.0
    label: str = MEASURED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerTime:
    """One layer's share of a model's latency (measured by a profiler, or estimated)."""

    name: str  # module name where known, else the runtime's node name
    op: str  # the layer or operator type
    ms: float
    share: float = 0.0  # fraction of the layers' total
    label: str = MEASURED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PredictedLatency:
    """Latency of a plan predicted from the lookup table, without building the model."""

    total_ms: float
    layers: tuple[LayerTime, ...]  # per-layer table values (before the model's fit), sorted
    runtime: str
    batch: int
    threads: int
    overhead_ms: float = 0.0  # the part of the total that no single layer accounts for
    note: str = ""
    label: str = ESTIMATED

    @property
    def throughput(self) -> float:
        return self.batch * 1e3 / self.total_ms if self.total_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["throughput"] = self.throughput
        return data


@dataclass(frozen=True)
class LayerEstimate:
    """One layer on a target device by the roofline model."""

    name: str
    op: str
    macs: float  # MACs the device executes (after pruning, and sparsity it exploits)
    bytes: float  # DRAM traffic: weights + input and output activations
    ms: float
    bound: str  # "compute" or "memory"
    energy_mj: float
    label: str = ESTIMATED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceEstimate:
    """Latency and energy of a model (or a plan of it) on a target device, estimated."""

    device: str
    dtype: str
    batch: int
    total_ms: float
    energy_mj: float
    macs: float
    bytes: float
    layers: tuple[LayerEstimate, ...] = field(default_factory=tuple)
    sparsity_used: str = "dense"  # which sparsity of the plan the device exploited
    source: str = ""
    label: str = ESTIMATED

    @property
    def compute_bound(self) -> int:
        return sum(1 for layer in self.layers if layer.bound == "compute")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        return data
