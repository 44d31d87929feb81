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
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import graph
from studio.core.models.data import DataSet
from studio.core.models.loaded import LoadedModel
from studio.core.paths import cache_dir
from studio.core.scan.exact import exact_reference, exact_rows
from studio.core.scan.masks import MASKABLE, channels_to_prune, nm_view, weight_mask
from studio.core.scan.taylor import TAYLOR_BATCH, taylor_pass
from studio.core.scan.types import ScanReport, ScanRow, ScanSettings, ScanTarget

CACHE_VERSION = 2  # 2: taylor estimates taken at batch-norm gates


# strategies that measure a scan's rows elsewhere: name -> rows(scan, todo, progress, cancel).
# The cluster stage, above this one, registers "ray" (studio.core.cluster.scan); the scan never
# imports it.
RemoteRows = Callable[..., Iterator[ScanRow]]
REMOTE_STRATEGIES: dict[str, RemoteRows] = {}


def register_strategy(name: str, rows: RemoteRows) -> None:
    """Make ``rows`` the strategy a scan uses for ``name`` (``ray``: a scan with an address)."""
    REMOTE_STRATEGIES[name] = rows


class SensitivityScan:
    """One scan of one model on one data set; ``prepare()`` then iterate ``run()``."""

    def __init__(
        self,
        model: LoadedModel,
        data: DataSet,
        settings: ScanSettings,
        use_cache: bool = True,
        workers: int | None = None,
        ray_address: str | None = None,
    ) -> None:
        self.model = model
        # exact scans split targets across threads, one model replica each (both cores);
        # on Ray (``ray_address``: see studio.core.cluster.connection) across that many Ray workers
        if workers is not None and workers < 1:
            raise StudioError(f"workers must be at least 1, got {workers}")
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.workers_given = workers is not None
        self.ray_address = ray_address
        self.ray_stats = None  # studio.core.cluster.scan.RayScanStats of the last Ray run
        self.data = data
        self.settings = settings
        self.use_cache = use_cache
        self.report: ScanReport | None = None
        self._targets: dict[str, object] = {}  # name -> tp group | weight tensor name
        self._graph = None
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ref: list[torch.Tensor] = []
        self._cache_path: Path | None = None
        self._taylor_sums: dict[str, torch.Tensor] = {}
        self._store: tuple | None = None  # exact: (micro-batches, values entering regions)

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
        if self.settings.method == "taylor":  # the gradient pass also gives the baseline
            bs = TAYLOR_BATCH
            self._ref, labels, self._taylor_sums = taylor_pass(
                module, self.data, self._targets, self.settings.mode == "structured", cancel
            )
        else:
            bs = self.settings.batch_size
            xs = [self.data.x[i : i + bs] for i in range(0, len(self.data), bs)]
            if self.settings.method == "exact":  # with the activations the scan reuses
                self._ref = exact_reference(self, targets, xs)
            else:
                with torch.inference_mode():
                    self._ref = [module(x).float() for x in xs]
            labels = [
                self.data.y[i : i + bs] if self.data.y is not None else ref.argmax(1)
                for i, ref in zip(range(0, len(self.data), bs), self._ref)
            ]
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
                if self.settings.mode == "nm" and nm_view(mod.weight) is None:
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
        if todo and self.ray_address is not None and self.settings.method != "taylor":
            ray_rows = REMOTE_STRATEGIES.get("ray")
            if ray_rows is None:
                raise StudioError(
                    "Ray scans need studio.core.cluster.scan imported: it registers the strategy"
                )
            self._store = None  # the workers keep their own
            rows = ray_rows(self, todo, progress, cancel)
        else:  # taylor is one gradient pass: it runs here
            rows = self.measure(todo, cancel)
        for row in rows:
            check(cancel)
            self.report.rows.append(row)
            self._save_cache()
            finished += 1
            report(progress, finished / total, f"{row.layer} @ {row.ratio:g}")
            yield row
        self.report.seconds += time.monotonic() - start

    def measure(self, todo: list, cancel: CancelToken | None = None) -> Iterator[ScanRow]:
        """Rows of ``todo`` [(target, ratios)] measured in this process, by the scan's method
        (Ray workers call this for their units)."""
        if not todo:
            return iter(())
        if self.settings.method == "taylor":
            return self._taylor(todo, cancel)
        if self.settings.method == "exact":
            return exact_rows(self, todo, cancel)
        return (row for t, rs in todo for row in self._naive(self.model.module, t, rs, cancel))

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
        key = f"heads:{target.name}"
        if key not in self._targets:  # looked up once: it walks every module
            self._targets[key] = graph.head_layout(self.model.module, target.name)
        layout: tuple[int, int] | None = self._targets[key]  # type: ignore[assignment]
        if layout:  # attention: the same head dimensions in q, k and v, equally per head
            parts, heads = layout
            per_head = channels_to_prune(len(scores) // parts // heads, ratio)
            return graph.qkv_channels(scores, heads, per_head, parts)
        k = channels_to_prune(len(scores), ratio)
        return sorted(np.argsort(scores, kind="stable")[:k].tolist())

    def _channel_scores(self, target: ScanTarget) -> np.ndarray:
        import torch_pruning as tp

        key = f"scores:{target.name}"
        if key not in self._targets and self.settings.criterion in ("apoz", "activation"):
            from studio.core.models.activations import tp_group_scores

            # measured on the data in one pass, for every group at once
            assert self.report is not None
            groups = {t.name: self._targets[t.name] for t in self.report.targets}
            sizes = {t.name: t.size for t in self.report.targets}
            scores = tp_group_scores(
                self.model.module, self.data, self._graph, groups, sizes, self.settings.criterion
            )
            self._targets.update({f"scores:{name}": v for name, v in scores.items()})
        if key not in self._targets:
            p = 1 if self.settings.criterion == "l1" else 2
            imp = tp.importance.GroupMagnitudeImportance(p=p, normalizer=None)
            with torch.no_grad():
                scores = imp(self._targets[target.name])
            self._targets[key] = scores.detach().double().cpu().numpy()
        return self._targets[key]  # type: ignore[return-value]

    # ---- naive: copy, prune, evaluate everything ------------------------------------------

    def _naive(
        self, source: nn.Module, target: ScanTarget, ratios: list[float], cancel: CancelToken | None
    ) -> Iterator[ScanRow]:
        for ratio in ratios:
            check(cancel)
            try:
                pruned = copy.deepcopy(source)
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

    # ---- taylor: first-order estimate -----------------------------------------------------

    def _taylor(self, todo: list, cancel: CancelToken | None) -> Iterator[ScanRow]:
        """Rows of the estimate made by :func:`studio.core.scan.taylor.taylor_pass`."""
        base = self.report.baseline.loss  # type: ignore[union-attr]
        nan = float("nan")
        for target, ratios in todo:
            check(cancel)
            importance = self._taylor_sums[target.name]
            for ratio in ratios:
                delta = float(importance[self._removed(target, ratio)].sum())
                yield ScanRow(target.name, ratio, None, base + delta, nan, nan, estimate=True)

    def _removed(self, target: ScanTarget, ratio: float) -> object:
        if self.settings.mode == "structured":
            return self._pruned_indices(target, ratio)
        weight = dict(self.model.module.named_modules())[target.name].weight
        return (self._mask(weight, ratio) == 0).flatten()

    def _mask(self, weight: torch.Tensor, ratio: float) -> torch.Tensor:
        """Keep-mask (1 = keep) of ``weight`` at ``ratio`` for this scan's mode and criterion."""
        return weight_mask(weight, ratio, self.settings.mode, self.settings.criterion)

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
