"""ONNX Runtime latency of the demo before and after pruning, and with INT8 on top, in one run.

The demo (ResNet-20) is pruned to a MACs target (uniform allocation, batch norms re-estimated
on the training split, as ``studio prune --target-macs`` does) and, for comparison, by a
uniform ratio of 0.5 per group, whose channel counts (8/16/32) stay multiples of 8. Each is
exported to a verified ONNX file; the MACs-target model is also quantized to INT8 (static and
dynamic). All sessions are timed side by side (alternating blocks of runs) at batch 1 and 32,
with the chosen number of ONNX Runtime threads; accuracy is measured in ONNX Runtime on the
validation split.

    .venv/bin/python benchmarks/export_speed.py [--target 0.5] [--threads 1] [--budget 2]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from studio.core.export.exporter import export_model
from studio.core.export.quantize import quantize_onnx
from studio.core.models import onnx_io as export_onnx
from studio.core.models.data import demo_splits
from studio.core.models.inventory import layer_rows, trace_layers
from studio.core.models.load import load_model
from studio.core.models.loaded import LoadedModel
from studio.core.plan.allocate import CostModel, allocate
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets


def macs(model: LoadedModel) -> int:
    _, counts = trace_layers(model.module, model.example_input())
    return sum(counts.get(name, 0) for name, _ in layer_rows(model.module, counts))


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    out = export_onnx.run(export_onnx.session(str(path)), x)[0]
    return float((out.argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5, help="fraction of MACs kept")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (0: all)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    train, val = demo_splits()
    demo = load_model("demo")
    base = PruningPlan("structured", model_fingerprint=demo.fingerprint())
    plan = allocate(CostModel.build(demo, "structured"), base, "uniform", "macs", args.target)
    by_target = prune(demo, plan, calibration=train).model
    half = dict.fromkeys(prune_targets(demo, "structured"), 0.5)
    by_ratio = prune(demo, PruningPlan("structured", ratios=half), calibration=train).model

    folder = Path(tempfile.mkdtemp(prefix="export-speed-"))
    rows: list[tuple[str, Path, int | None, int | None]] = []
    for label, model in (
        ("original", demo),
        (f"pruned to {args.target:g} MACs", by_target),
        ("pruned 0.5/group (x8 ch.)", by_ratio),
    ):
        path = folder / f"{len(rows)}.onnx"
        result = export_model(model, "onnx", path, measure_latency=False)
        print(f"{label}: {result.params:,} parameters in the file (model {result.params_model:,}),"
              f" largest difference {result.max_abs_diff:.2g}")  # fmt: skip
        rows.append((label, path, result.params, macs(model)))
    for mode in ("static", "dynamic"):
        path = folder / f"int8_{mode}.onnx"
        quantize_onnx(rows[1][1], path, mode, val, train, measure_latency=False)
        rows.append((f"  + INT8 {mode}", path, None, None))

    x, y = val.x.numpy(), val.y.numpy()
    sessions = [export_onnx.session(str(path), args.threads) for _, path, _, _ in rows]
    timing = {
        batch: export_onnx.latencies_ms(sessions, x[:batch], args.budget) for batch in (1, 32)
    }
    print(f"\nONNX Runtime, {args.threads or 'all'} thread(s), median latency; accuracy on "
          f"{len(val)} validation images")  # fmt: skip
    print(f"{'model':<28}{'params':>10}{'MACs':>12}{'bytes':>11}{'acc':>8}"
          f"{'ms b=1':>9}{'x':>6}{'ms b=32':>9}{'x':>6}")  # fmt: skip
    for i, (label, path, params, mac) in enumerate(rows):
        b1, b32 = timing[1][i], timing[32][i]
        print(
            f"{label:<28}{f'{params:,}' if params else '':>10}{f'{mac:,}' if mac else '':>12}"
            f"{path.stat().st_size:>11,}"
            f"{accuracy(path, x, y):>8.4f}{b1:>9.3f}{timing[1][0] / b1:>6.2f}"
            f"{b32:>9.3f}{timing[32][0] / b32:>6.2f}"
        )
    odd, convs = export_onnx.unaligned_convs(onnx.load(str(rows[1][1])))
    print(f"\n{odd} of {convs} convolutions of the MACs-target model have channel counts that "
          "are not multiples of 8 (ONNX Runtime's NCHWc layout skips them)")  # fmt: skip


if __name__ == "__main__":
    main()
