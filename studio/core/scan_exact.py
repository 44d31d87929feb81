"""The exact scan: each target pruned in place on a private model replica and restored,
with only the network downstream of the target recomputed from activations stored once.

Targets are pulled from a queue by one thread per core, each with its own replica and one
torch thread: small convolutions scale better across replicas than across intra-op threads.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from studio.core import graph
from studio.core.jobs import CancelToken, check
from studio.core.partial_eval import PartialRunner
from studio.core.sensitivity_types import ScanRow, ScanTarget

if TYPE_CHECKING:
    from studio.core.sensitivity import SensitivityScan

MAX_STORE_BYTES = 1 << 30  # activations kept for reuse across targets


def exact_rows(scan: SensitivityScan, todo: list, cancel: CancelToken | None) -> Iterator[ScanRow]:
    """Measure ``todo`` [(target, ratios)] with the exact method, in parallel when it can."""
    if scan.settings.mode == "structured":
        for target, _ in todo:
            scan._channel_scores(target)  # computed once, before any thread starts
    store = _frontier_store(scan, todo)
    workers = min(scan.workers, len(todo))
    if workers == 1:
        replica = Replica(scan)
        for target, ratios in todo:
            yield from _exact(scan, replica, target, ratios, store, cancel)
        return
    yield from _parallel(scan, todo, store, cancel, workers)


def _exact(
    scan: SensitivityScan,
    replica: Replica,
    target: ScanTarget,
    ratios: list[float],
    store: list[dict[str, torch.Tensor]] | None,
    cancel: CancelToken | None,
) -> Iterator[ScanRow]:
    if _needs_copy(scan, target):  # Torch-Pruning replaces bare parameters: prune a copy
        yield from scan._naive(replica.module, target, ratios, cancel)
        return
    region = replica.runner.region(target.layers)
    names = set(region.frontier_names)
    xs = [x for x, _ in scan._batches]
    with torch.inference_mode():
        if store is not None and names <= set(store[0]):
            frontier = [{n: values[n] for n in names} for values in store]

            def outputs() -> list[torch.Tensor]:
                return [region.forward_named(f, x) for f, x in zip(frontier, xs)]
        else:
            computed = [region.frontier_values(x) for x in xs]

            def outputs() -> list[torch.Tensor]:
                return [region.forward(f) for f in computed]

    for ratio in ratios:
        check(cancel)
        try:
            with _InPlace(scan, replica, target, ratio), torch.inference_mode():
                try:
                    result = outputs()
                except Exception:  # the traced graph holds shapes the pruning changed
                    result = [replica.module(x) for x in xs]
            row = scan._row(target.name, ratio, result)
        except Exception as exc:
            row = scan._failed(target, ratio, exc)
        yield row


def _frontier_store(scan: SensitivityScan, todo: list) -> list[dict[str, torch.Tensor]] | None:
    """Activations entering every target's region, computed in one pass and shared,
    or None when they would take more than MAX_STORE_BYTES (then each target computes its
    own)."""
    runner = PartialRunner(scan.model.module)
    if not runner.traced:
        return None
    names: set[str] = set()
    for target, _ in todo:
        region = runner.region(target.layers)
        if not region.full:
            names.update(region.frontier_names)
    if not names:
        return None
    store = []
    with torch.inference_mode():
        for i, (x, _) in enumerate(scan._batches):
            store.append(runner.node_values(x, names))
            if i == 0:
                size = sum(
                    v.numel() * v.element_size()
                    for v in store[0].values()
                    if isinstance(v, torch.Tensor)
                )
                if size * len(scan.data) / max(1, len(x)) > MAX_STORE_BYTES:
                    return None
    return store


def _needs_copy(scan: SensitivityScan, target: ScanTarget) -> bool:
    if scan.settings.mode != "structured":
        return False
    group = scan._targets[target.name]
    return any(not isinstance(dep.target.module, nn.Module) for dep, _ in group)


class Replica:
    """A private copy of the model with its own dependency graph and traced graph."""

    def __init__(self, scan: SensitivityScan) -> None:
        self.module = copy.deepcopy(scan.model.module).eval()
        self.graph = None
        self.groups: dict[str, object] = {}
        if scan.settings.mode == "structured":
            x = scan.model.example_input()
            outputs = graph.output_layers(self.module, x)
            self.graph, groups = graph.traced_groups(self.module, x, ignored=outputs)
            self.groups = {info.root: group for info, group in groups}
        self.runner = PartialRunner(self.module)


class _InPlace:
    """Prune a target of a replica for the duration of a ``with`` block, then restore it."""

    def __init__(self, scan: SensitivityScan, replica: Replica, target: ScanTarget, ratio: float):
        self.scan, self.replica, self.target, self.ratio = scan, replica, target, ratio
        self.saved: list = []

    def __enter__(self) -> None:
        scan, target = self.scan, self.target
        if scan.settings.mode != "structured":
            weight = dict(self.replica.module.named_modules())[target.name].weight
            self.saved = [(weight, weight.detach().clone())]
            with torch.no_grad():
                weight.mul_(scan._mask(weight, self.ratio))
            return
        group = self.replica.groups[target.name]
        root = group[0].dep.target.module  # type: ignore[index]
        pruning = self.replica.graph.get_pruning_group(  # type: ignore[union-attr]
            root,
            group[0].dep.handler,
            scan._pruned_indices(target, self.ratio),  # type: ignore[index]
        )
        for mod in {id(d.target.module): d.target.module for d, _ in pruning}.values():
            if isinstance(mod, nn.Module):
                self.saved.append((mod, _snapshot(mod)))
        pruning.prune(record_history=False)

    def __exit__(self, *exc: object) -> None:
        if self.scan.settings.mode != "structured":
            with torch.no_grad():
                for weight, original in self.saved:
                    weight.copy_(original)
            return
        for mod, state in self.saved:
            _restore(mod, state)


_DONE = object()


def _parallel(
    scan: SensitivityScan,
    todo: list,
    store: list[dict[str, torch.Tensor]] | None,
    cancel: CancelToken | None,
    workers: int,
) -> Iterator[ScanRow]:
    """Targets pulled from a queue by ``workers`` threads, each with its own replica and one
    torch thread (small convolutions scale better across replicas than across threads)."""
    tasks: queue.Queue = queue.Queue()
    for item in todo:
        tasks.put(item)
    results: queue.Queue = queue.Queue()
    stop = threading.Event()
    replicas = [Replica(scan) for _ in range(workers)]

    def work(replica: Replica) -> None:
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        try:
            while not stop.is_set():
                try:
                    target, ratios = tasks.get_nowait()
                except queue.Empty:
                    break
                for row in _exact(scan, replica, target, ratios, store, cancel):
                    results.put(row)
                    if stop.is_set():
                        break
        except BaseException as exc:  # handed to the caller's thread
            results.put(exc)
        finally:
            results.put(_DONE)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in replicas]
    for t in threads:
        t.start()
    try:
        running = len(threads)
        while running:
            item = results.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for t in threads:
            t.join()
        torch.set_num_threads(previous)


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
