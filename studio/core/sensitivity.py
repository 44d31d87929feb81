"""Sensitivity scans: prune one layer (or dependency group) alone at each ratio, measure.

Methods:
- ``naive``: the yardstick other tools use: copy the model, build its dependency graph,
  prune, evaluate the whole network on the whole data set, for every (target, ratio).
- ``exact``: the same numbers without copies: the target is pruned in place (physically for
  structured scans, by masks otherwise) and restored afterwards, and only the part of the
  network downstream of the target is recomputed, from activations computed once per target.
- ``taylor``: a first-order estimate of the loss increase from one pass of gradients.

Channels or weights to remove are chosen by L2 (or L1) magnitude, as the pruning engine does:
structured groups use Torch-Pruning's group magnitude importance.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.core import graph
from studio.core.data import DataSet
from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import LoadedModel
from studio.core.partial_eval import PartialRunner
from studio.core.paths import cache_dir
from studio.core.sensitivity_types import NM_GROUP, ScanReport, ScanRow, ScanSettings, ScanTarget

CACHE_VERSION = 1
MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def channels_to_prune(channels: int, ratio: float) -> int:
    """How many of ``channels`` a ratio removes (floor, never all of them)."""
    return min(channels - 1, max(0, math.floor(channels * ratio + 1e-9)))


class SensitivityScan:
    """One scan of one model on one data set; ``prepare()`` then iterate ``run()``."""

    def __init__(
        self, model: LoadedModel, data: DataSet, settings: ScanSettings, use_cache: bool = True
    ) -> None:
        self.model = model
        self.data = data
        self.settings = settings
        self.use_cache = use_cache
        self.report: ScanReport | None = None
        self._targets: dict[str, object] = {}  # name -> tp group | weight tensor name
        self._graph = None
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ref: list[torch.Tensor] = []
        self._cache_path: Path | None = None

    # ---- set-up -------------------------------------------------------------------------

    def prepare(
        self, progress: ProgressFn | None = None, cancel: CancelToken | None = None
    ) -> ScanReport:
        """Find targets, evaluate the unpruned model, and load finished rows from the cache."""
        if self.settings.mode == "structured":
            self.model.require("structural pruning")
        if len(self.data) == 0:
            raise StudioError(f"data set {self.data.name} is empty")
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        module = self.model.module.eval()
        report(progress, 0.0, "finding targets")
        targets = self._find_targets(module)
        if not targets:
            raise StudioError(f"nothing to scan in {self.model.name} for mode {self.settings.mode}")
        check(cancel)
        report(progress, 0.3, "evaluating the unpruned model")
        bs = self.settings.batch_size
        with torch.inference_mode():
            self._ref = [
                module(self.data.x[i : i + bs]).float() for i in range(0, len(self.data), bs)
            ]
        labels = []
        for i, ref in zip(range(0, len(self.data), bs), self._ref):
            y = self.data.y[i : i + bs] if self.data.y is not None else ref.argmax(1)
            labels.append(y)
        self._batches = [
            (self.data.x[i : i + bs], y) for i, y in zip(range(0, len(self.data), bs), labels)
        ]
        baseline = self._row("(baseline)", 0.0, self._ref)
        self.report = ScanReport(self.settings, targets, baseline)
        if self.use_cache:
            self._cache_path = self._cache_file()
            wanted = {(t.name, r) for t in targets for r in self.settings.ratios}
            for row in self._load_cache():
                if (row.layer, row.ratio) in wanted:
                    self.report.rows.append(row)
                    wanted.discard((row.layer, row.ratio))
            self.report.cached_rows = len(self.report.rows)
        report(progress, 1.0, f"{len(targets)} targets")
        return self.report

    def _find_targets(self, module: nn.Module) -> list[ScanTarget]:
        x = self.model.example_input()
        mods = dict(module.named_modules())
        targets = []
        if self.settings.mode == "structured":
            outputs = graph.output_layers(module, x)
            self._graph, groups = graph.traced_groups(module, x, ignored=outputs)
            for info, group in groups:
                params = sum(
                    p.numel() for n in info.layers for p in mods[n].parameters(recurse=False)
                )
                targets.append(ScanTarget(info.root, info.layers, info.channels, params))
                self._targets[info.root] = group
            return targets
        for name, mod in module.named_modules():
            if isinstance(mod, MASKABLE) and mod.weight.dim() >= 2:
                if self.settings.mode == "nm" and _nm_view(mod.weight) is None:
                    continue  # fewer than 4 input weights per row, or not a multiple of 4
                n = mod.weight.numel()
                targets.append(ScanTarget(name, (name,), n, n))
                self._targets[name] = name
        return targets

    # ---- running ------------------------------------------------------------------------

    def run(
        self, progress: ProgressFn | None = None, cancel: CancelToken | None = None
    ) -> Iterator[ScanRow]:
        """Measure every (target, ratio) not already done, yielding rows as they finish."""
        if self.report is None:
            self.prepare(cancel=cancel)
        assert self.report is not None
        start = time.monotonic()
        done = {(r.layer, r.ratio) for r in self.report.rows}
        ratios = sorted(self.settings.ratios)
        todo = [(t, [r for r in ratios if (t.name, r) not in done]) for t in self.report.targets]
        todo = [(t, rs) for t, rs in todo if rs]
        total = sum(len(rs) for _, rs in todo) or 1
        finished = 0
        if self.settings.method == "taylor" and todo:
            rows = self._taylor(todo, cancel)
        else:
            measure = self._exact if self.settings.method == "exact" else self._naive
            rows = (row for target, rs in todo for row in measure(target, rs, cancel))
        for row in rows:
            check(cancel)
            self.report.rows.append(row)
            self._save_cache()
            finished += 1
            report(progress, finished / total, f"{row.layer} @ {row.ratio:g}")
            yield row
        self.report.seconds += time.monotonic() - start

    def _row(self, layer: str, ratio: float, outputs: list[torch.Tensor]) -> ScanRow:
        n = len(self.data)
        correct = ce = agree = kl = 0.0
        for out, ref, (_, y) in zip(outputs, self._ref, self._batches):
            out = out.float()
            correct += float((out.argmax(1) == y).sum())
            ce += float(F.cross_entropy(out.double(), y, reduction="sum"))
            agree += float((out.argmax(1) == ref.argmax(1)).sum())
            kl += float(
                F.kl_div(
                    F.log_softmax(out.double(), 1),
                    F.log_softmax(ref.double(), 1),
                    log_target=True,
                    reduction="sum",
                )
            )
        accuracy = correct / n if self.data.labelled else None
        return ScanRow(layer, ratio, accuracy, ce / n, agree / n, kl / n)

    def _failed(self, target: ScanTarget, ratio: float, exc: Exception) -> ScanRow:
        first = str(exc).splitlines()[0] if str(exc) else ""
        message = f"{type(exc).__name__}: {first}"[:200]
        nan = float("nan")
        return ScanRow(
            target.name, ratio, nan if self.data.labelled else None, nan, nan, nan, error=message
        )

    def _pruned_indices(self, target: ScanTarget, ratio: float) -> list[int]:
        scores = self._channel_scores(target)
        k = channels_to_prune(len(scores), ratio)
        return sorted(np.argsort(scores, kind="stable")[:k].tolist())

    def _channel_scores(self, target: ScanTarget) -> np.ndarray:
        import torch_pruning as tp

        key = f"scores:{target.name}"
        if key not in self._targets:
            p = 1 if self.settings.criterion == "l1" else 2
            imp = tp.importance.GroupMagnitudeImportance(p=p, normalizer=None)
            with torch.no_grad():
                scores = imp(self._targets[target.name])
            self._targets[key] = scores.detach().double().cpu().numpy()
        return self._targets[key]  # type: ignore[return-value]

    # ---- exact: in place, partial recompute ---------------------------------------------

    def _exact(
        self, target: ScanTarget, ratios: list[float], cancel: CancelToken | None
    ) -> Iterator[ScanRow]:
        if self._needs_copy(target):  # Torch-Pruning replaces bare parameters: prune a copy
            yield from self._naive(target, ratios, cancel)
            return
        module = self.model.module
        runner = self._runner()
        region = runner.region(target.layers)
        with torch.inference_mode():
            frontier = [region.frontier_values(x) for x, _ in self._batches]
        for ratio in ratios:
            check(cancel)
            try:
                with self._pruned_in_place(module, target, ratio), torch.inference_mode():
                    try:
                        outputs = [region.forward(f) for f in frontier]
                    except Exception:  # the traced graph holds shapes the pruning changed
                        outputs = [module(x) for x, _ in self._batches]
                row = self._row(target.name, ratio, outputs)
            except Exception as exc:
                row = self._failed(target, ratio, exc)
            yield row

    def _needs_copy(self, target: ScanTarget) -> bool:
        if self.settings.mode != "structured":
            return False
        group = self._targets[target.name]
        return any(not isinstance(dep.target.module, nn.Module) for dep, _ in group)

    def _runner(self) -> PartialRunner:
        if "runner" not in self._targets:
            self._targets["runner"] = PartialRunner(self.model.module)
        return self._targets["runner"]  # type: ignore[return-value]

    def _pruned_in_place(self, module: nn.Module, target: ScanTarget, ratio: float):
        return _InPlace(self, module, target, ratio)

    # ---- naive: copy, prune, evaluate everything ------------------------------------------

    def _naive(
        self, target: ScanTarget, ratios: list[float], cancel: CancelToken | None
    ) -> Iterator[ScanRow]:
        for ratio in ratios:
            check(cancel)
            try:
                pruned = copy.deepcopy(self.model.module)
                self._prune_copy(pruned, target, ratio)
                with torch.inference_mode():
                    outputs = [pruned(x) for x, _ in self._batches]
                row = self._row(target.name, ratio, outputs)
            except Exception as exc:
                row = self._failed(target, ratio, exc)
            yield row

    def _prune_copy(self, pruned: nn.Module, target: ScanTarget, ratio: float) -> None:
        mods = dict(pruned.named_modules())
        if self.settings.mode != "structured":
            with torch.no_grad():
                weight = mods[target.name].weight
                weight.mul_(self._mask(weight, ratio))
            return
        import torch_pruning as tp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(
                pruned, example_inputs=self.model.example_input(), verbose=False
            )
        root = mods[target.name]
        handler = dg.get_pruner_of_module(root).prune_out_channels
        dg.get_pruning_group(root, handler, self._pruned_indices(target, ratio)).prune()

    def _mask(self, weight: torch.Tensor, ratio: float) -> torch.Tensor:
        """Keep-mask (1 = keep) removing the smallest weights: a fraction, or N of every 4."""
        magnitude = weight.detach().abs()
        if self.settings.criterion == "l2":
            magnitude = magnitude * magnitude
        if self.settings.mode == "nm":
            view = _nm_view(magnitude)
            assert view is not None
            zeros = round(ratio * NM_GROUP)
            order = view.argsort(dim=-1, stable=True)
            keep = torch.ones_like(view)
            keep.scatter_(-1, order[..., :zeros], 0.0)
            return _nm_unview(keep, weight.shape)
        k = math.floor(weight.numel() * ratio + 1e-9)
        flat = magnitude.flatten()
        keep = torch.ones_like(flat)
        keep[flat.argsort(stable=True)[:k]] = 0.0
        return keep.view_as(weight)

    # ---- taylor: first-order estimate -----------------------------------------------------

    def _taylor(self, todo: list, cancel: CancelToken | None) -> Iterator[ScanRow]:
        module = self.model.module
        params = list(module.parameters())
        saved_grads = [p.grad for p in params]
        saved_flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.grad = None
                p.requires_grad_(True)
            n = len(self.data)
            with torch.enable_grad():
                for x, y in self._batches:
                    check(cancel)
                    loss = F.cross_entropy(module(x), y, reduction="sum") / n
                    loss.backward()
            base = self.report.baseline.loss  # type: ignore[union-attr]
            estimates = {}
            for target, ratios in todo:
                for ratio in ratios:
                    estimates[(target.name, ratio)] = self._taylor_delta(target, ratio)
        finally:
            for p, g, flag in zip(params, saved_grads, saved_flags):
                p.grad = g
                p.requires_grad_(flag)
        nan = float("nan")
        for (name, ratio), delta in estimates.items():
            yield ScanRow(name, ratio, None, base + delta, nan, nan, estimate=True)

    def _taylor_delta(self, target: ScanTarget, ratio: float) -> float:
        if self.settings.mode == "structured":
            import torch_pruning as tp

            key = f"taylor:{target.name}"
            if key not in self._targets:
                imp = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
                with torch.no_grad():
                    self._targets[key] = imp(self._targets[target.name]).double().cpu().numpy()
            scores = self._targets[key]
            return float(np.sum(scores[self._pruned_indices(target, ratio)]))  # type: ignore[index]
        weight = dict(self.model.module.named_modules())[target.name].weight
        removed = 1.0 - self._mask(weight, ratio)
        return float((weight.detach() * weight.grad * removed).abs().sum())

    # ---- cache ----------------------------------------------------------------------------

    def _cache_file(self) -> Path:
        key = json.dumps(
            {
                "v": CACHE_VERSION,
                "model": self.model.fingerprint(),
                "data": self.data.fingerprint(),
                **self.settings.cache_fields(),
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        folder = cache_dir() / "sensitivity"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{digest}.json"

    def _load_cache(self) -> list[ScanRow]:
        if self._cache_path is None or not self._cache_path.exists():
            return []
        try:
            rows = json.loads(self._cache_path.read_text())["rows"]
            return [ScanRow(**row) for row in rows if not row.get("error")]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # a damaged cache is ignored and rewritten

    def _save_cache(self) -> None:
        if self._cache_path is None or self.report is None:
            return
        rows = [r.to_dict() for r in self.report.rows]
        tmp = self._cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "rows": rows}))
        os.replace(tmp, self._cache_path)


class _InPlace:
    """Prune a target in place for the duration of a ``with`` block, then restore it."""

    def __init__(self, scan: SensitivityScan, module: nn.Module, target: ScanTarget, ratio: float):
        self.scan, self.module, self.target, self.ratio = scan, module, target, ratio
        self.saved: list = []

    def __enter__(self) -> None:
        scan, target = self.scan, self.target
        if scan.settings.mode != "structured":
            weight = dict(self.module.named_modules())[target.name].weight
            self.saved = [(weight, weight.detach().clone())]
            with torch.no_grad():
                weight.mul_(scan._mask(weight, self.ratio))
            return
        group = scan._targets[target.name]
        root = group[0].dep.target.module
        dg = scan._graph
        pruning = dg.get_pruning_group(
            root, group[0].dep.handler, scan._pruned_indices(target, self.ratio)
        )
        touched = {id(d.target.module): d.target.module for d, _ in pruning}
        for mod in touched.values():
            if isinstance(mod, nn.Module):
                self.saved.append((mod, _snapshot(mod)))
            elif isinstance(mod, torch.Tensor):
                raise StudioError("groups with bare parameters are pruned on a copy")
        pruning.prune(record_history=False)

    def __exit__(self, *exc: object) -> None:
        if self.scan.settings.mode != "structured":
            with torch.no_grad():
                for weight, original in self.saved:
                    weight.copy_(original)
            return
        for mod, state in self.saved:
            _restore(mod, state)


def _snapshot(mod: nn.Module) -> dict:
    attrs = {
        k: v for k, v in mod.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")
    }
    return {"attrs": attrs, "params": dict(mod._parameters), "buffers": dict(mod._buffers)}


def _restore(mod: nn.Module, state: dict) -> None:
    mod.__dict__.update(state["attrs"])
    mod._parameters.clear()
    mod._parameters.update(state["params"])
    mod._buffers.clear()
    mod._buffers.update(state["buffers"])


def _nm_view(weight: torch.Tensor) -> torch.Tensor | None:
    """Weights as (..., groups, 4) along the input dimension (channels-last for convs)."""
    w = weight.movedim(1, -1) if weight.dim() > 2 else weight
    if w.shape[-1] % NM_GROUP:
        return None
    return w.reshape(*w.shape[:-1], w.shape[-1] // NM_GROUP, NM_GROUP)


def _nm_unview(view: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        return view.reshape(moved).movedim(-1, 1)
    return view.reshape(shape)


def scan(
    model: LoadedModel,
    data: DataSet,
    settings: ScanSettings,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    use_cache: bool = True,
) -> ScanReport:
    """Run a whole scan (resuming from the cache) and return its report."""
    job = SensitivityScan(model, data, settings, use_cache)
    job.prepare(cancel=cancel)
    for _ in job.run(progress, cancel):
        pass
    assert job.report is not None
    return job.report
