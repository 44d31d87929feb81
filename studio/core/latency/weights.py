"""Each layer's measured time per MAC, for allocating by drop per millisecond saved.

A MAC of a depthwise or late, small layer costs more time than one of a large convolution
(memory- and overhead-bound), so the MACs a plan removes are not the time it saves. The
unpruned model's per-layer profile in the runtime (ONNX Runtime's own profiler, about a second)
gives each layer's milliseconds; divided by its MACs they weight the staircase's moves
(:func:`studio.core.plan.staircase.staircase`)."""

from __future__ import annotations

import numpy as np

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.measure import profile_layers
from studio.core.models.loaded import LoadedModel
from studio.core.plan.costs import CostModel


def layer_weights(
    model: LoadedModel,
    cost: CostModel,
    runtime: str = "onnxruntime",
    batch: int = 1,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """ms per MAC of each layer of ``cost.rows``, scaled so that the model's MACs-weighted mean
    is 1 (layers the profile does not name get 1)."""
    times = {t.name: t.ms for t in profile_layers(model, runtime, batch, threads, runs=20,
                                                  progress=progress, cancel=cancel)}  # fmt: skip
    macs = cost.layer_macs()
    raw = np.array(
        [times.get(name, np.nan) / m if m > 0 else np.nan for name, m in zip(cost.rows, macs)]
    )
    known = np.isfinite(raw) & (raw > 0)
    if not known.any():
        return np.ones(len(cost.rows))
    mean = float(np.sum(raw[known] * macs[known]) / np.sum(macs[known]))
    return np.where(known, raw / mean, 1.0)
