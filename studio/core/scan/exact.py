"""The exact scan: each target pruned in place on a private model replica and restored,
with only the network downstream of the target recomputed from activations stored once.

Targets are pulled from a queue by one thread per core, each with its own replica and one
torch thread: small convolutions scale better across replicas than across intra-op threads.
Batches are run in micro-batches whose activations stay in cache (a sample's outputs do not
depend on the batch it is in), and convolutions of the target that only lose output channels
are computed once per target and then selected from (the kept channels of a convolution are
computed exactly as before): the numbers are those of the naive method (bit for bit on the
demo).
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from studio.core.jobs import CancelToken, check
from studio.core.models import graph
from studio.core.scan.partial_eval import PartialRunner, peak_bytes
from studio.core.scan.types import ScanRow, ScanTarget

# The functions here take the SensitivityScan that runs them (it passes itself; this module
# never imports it): ``Scan`` is that object.
Scan = Any

MAX_STORE_BYTES = 1 << 30  # activations kept for reuse across targets
CHUNK_BYTES = 2 << 20  # largest activation of one micro-batch, so that it stays in cache
SLICEABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # losing output channels = selecting outputs

Chunks = list[tuple[int, torch.Tensor]]  # (index of the batch, micro-batch of its inputs)


def exact_reference(scan: Scan, targets: list[ScanTarget], xs: list) -> list:
    """The unchanged model's outputs for the batches ``xs``. For a traced model they are
    computed in micro-batches in the same pass that stores the activations entering every
    target's region, kept in ``scan._store`` for :func:`exact_rows`."""
    module = scan.model.module
    runner = PartialRunner(module)
    if not runner.traced:
        with torch.inference_mode():
            return [module(x).float() for x in xs]
    chunks = _chunks(scan, xs)
    names = _frontier_names(runner, targets)
    outputs: list[torch.Tensor] = []
    store: list[dict[str, torch.Tensor]] | None = []
    with torch.inference_mode():
        for _, x in chunks:
            out, values = runner.run(x, names)
            outputs.append(out.float())  # type: ignore[union-attr]
            if store is not None:
                store.append(values)
                if _store_bytes(store[0], len(x), len(scan.data)) > MAX_STORE_BYTES:
                    store = None
    scan._store = (chunks, store)
    return _regroup(outputs, chunks)


def exact_rows(scan: Scan, todo: list, cancel: CancelToken | None) -> Iterator[ScanRow]:
    """Measure ``todo`` [(target, ratios)] with the exact method, in parallel when it can."""
    if scan.settings.mode == "structured":
        for target, _ in todo:
            scan._channel_scores(target)  # computed once, before any thread starts
    if scan._store is not None:  # from exact_reference, for every target
        chunks, store = scan._store
    else:
        chunks = _chunks(scan, [x for x, _ in scan._batches])
        store = _frontier_store(scan, todo, chunks)
    scan._store = None  # not kept past the scan (a later run computes it again)
    workers = min(scan.workers, len(todo))
    if workers == 1:
        replica = Replica(scan)
        for target, ratios in todo:
            yield from _exact(scan, replica, target, ratios, store, chunks, cancel)
        return
    yield from _parallel(scan, todo, store, chunks, cancel, workers)


def _exact(
    scan: Scan,
    replica: Replica,
    target: ScanTarget,
    ratios: list[float],
    store: list[dict[str, torch.Tensor]] | None,
    chunks: Chunks,
    cancel: CancelToken | None,
) -> Iterator[ScanRow]:
    if _needs_copy(scan, target):  # Torch-Pruning replaces bare parameters: prune a copy
        yield from scan._naive(replica.module, target, ratios, cancel)
        return
    region = replica.runner.region(target.layers, replica.sliceable(target.name))
    names = region.frontier_names
    with torch.inference_mode():
        if store is not None and set(names) <= set(store[0]):
            frontier = [{n: values[n] for n in names} for values in store]
        else:
            frontier = [region.frontier_values(x) for _, x in chunks]
        unpruned = [region.reused_values(values) for values in frontier]
    xs = [x for x, _ in scan._batches]
    for ratio in ratios:
        check(cancel)
        try:
            with _InPlace(scan, replica, target, ratio, region.reused_layers) as kept:
                with torch.inference_mode():
                    try:
                        outs = [
                            region.forward(values, x, _select(u, kept))
                            for values, u, (_, x) in zip(frontier, unpruned, chunks)
                        ]
                        result = _regroup(outs, chunks)
                    except Exception:  # the traced graph holds shapes the pruning changed
                        result = [replica.module(x) for x in xs]
            row = scan._row(target.name, ratio, result)
        except Exception as exc:
            row = scan._failed(target, ratio, exc)
        yield row


def _select(outputs: list[torch.Tensor], kept: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The kept output channels of each reused layer (all of them where ``kept`` is None)."""
    return [out if k is None else out.index_select(1, k) for out, k in zip(outputs, kept)]


def _chunks(scan: Scan, xs: list[torch.Tensor]) -> Chunks:
    """Every batch cut into micro-batches whose largest activation takes about CHUNK_BYTES
    (outputs do not depend on how a batch is cut; :func:`_regroup` joins them again)."""
    peak = peak_bytes(scan.model.module, scan.model.example_input())
    size = max(1, CHUNK_BYTES // max(1, peak))
    return [(b, x[i : i + size]) for b, x in enumerate(xs) for i in range(0, len(x), size)]


def _regroup(outputs: list[torch.Tensor], chunks: Chunks) -> list[torch.Tensor]:
    """Micro-batch outputs joined back into one tensor per batch."""
    parts: dict[int, list[torch.Tensor]] = {}
    for out, (b, _) in zip(outputs, chunks):
        parts.setdefault(b, []).append(out)
    return [torch.cat(p) if len(p) > 1 else p[0] for p in parts.values()]


def _frontier_names(runner: PartialRunner, targets: list) -> set[str]:
    """Names of the values entering the regions of ``targets`` (or of [(target, ratios)])."""
    names: set[str] = set()
    for item in targets:
        region = runner.region((item[0] if isinstance(item, tuple) else item).layers)
        if not region.full:
            names.update(region.frontier_names)
    return names


def _store_bytes(first: dict, chunk: int, total: int) -> float:
    """The size of a store whose first micro-batch of ``chunk`` inputs holds ``first``."""
    size = sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor))
    return size * total / max(1, chunk)


def _frontier_store(scan: Scan, todo: list, chunks: Chunks) -> list[dict[str, torch.Tensor]] | None:
    """Activations entering every target's region, computed in one pass and shared,
    or None when they would take more than MAX_STORE_BYTES (then each target computes its
    own)."""
    runner = PartialRunner(scan.model.module)
    names = _frontier_names(runner, todo) if runner.traced else set()
    if not names:
        return None
    store = []
    with torch.inference_mode():
        for _, x in chunks:
            store.append(runner.node_values(x, names))
            if _store_bytes(store[0], len(x), len(scan.data)) > MAX_STORE_BYTES:
                return None
    return store


def _needs_copy(scan: Scan, target: ScanTarget) -> bool:
    if scan.settings.mode != "structured":
        return False
    group = scan._targets[target.name]
    return any(not isinstance(dep.target.module, nn.Module) for dep, _ in group)


class Replica:
    """A private copy of the model with its own dependency graph and traced graph."""

    def __init__(self, scan: Scan) -> None:
        self.module = copy.deepcopy(scan.model.module).eval()
        self.names = {mod: name for name, mod in self.module.named_modules()}
        self.graph = None
        self.groups: dict[str, object] = {}
        if scan.settings.mode == "structured":
            x = scan.model.example_input()
            outputs = graph.output_layers(self.module, x)
            self.graph, groups = graph.traced_groups(self.module, x, ignored=outputs)
            self.groups = {info.root: group for info, group in groups}
        self.runner = PartialRunner(self.module)

    def sliceable(self, target: str) -> list[str]:
        """Convolutions of a target's group that only lose output channels."""
        group = self.groups.get(target)
        if group is None:
            return []
        out: set[nn.Module] = set()
        other: set[nn.Module] = set()
        for dep, _ in group:  # type: ignore[attr-defined]
            is_out = self.graph.is_out_channel_pruning_fn(dep.handler)  # type: ignore[union-attr]
            (out if is_out else other).add(dep.target.module)
        return [
            self.names[m]
            for m in out - other
            if isinstance(m, SLICEABLE) and m.groups == 1 and m in self.names
        ]


class _InPlace:
    """Prune a target of a replica for the duration of a ``with`` block, then restore it;
    entering gives the output channels that each of ``layers`` keeps."""

    def __init__(
        self,
        scan: Scan,
        replica: Replica,
        target: ScanTarget,
        ratio: float,
        layers: Sequence[str] = (),
    ) -> None:
        self.scan, self.replica, self.target, self.ratio = scan, replica, target, ratio
        self.layers = list(layers)
        self.saved: list = []

    def __enter__(self) -> list[torch.Tensor | None]:
        scan, target = self.scan, self.target
        if scan.settings.mode != "structured":
            weight = dict(self.replica.module.named_modules())[target.name].weight
            self.saved = [(weight, weight.detach().clone())]
            with torch.no_grad():
                weight.mul_(scan._mask(weight, self.ratio))
            return []
        group = self.replica.groups[target.name]
        root = group[0].dep.target.module  # type: ignore[index]
        pruning = self.replica.graph.get_pruning_group(  # type: ignore[union-attr]
            root,
            group[0].dep.handler,
            scan._pruned_indices(target, self.ratio),  # type: ignore[index]
        )
        removed: dict[str, set[int]] = {name: set() for name in self.layers}
        mods = {}
        for dep, idxs in pruning:
            mod = dep.target.module
            name = self.replica.names.get(mod)
            if name in removed and self.replica.graph.is_out_channel_pruning_fn(dep.handler):
                removed[name].update(int(i) for i in idxs)
                mods[name] = mod
        kept = [
            torch.tensor([i for i in range(mods[n].out_channels) if i not in removed[n]])
            if n in mods
            else None
            for n in self.layers
        ]
        for mod in {id(d.target.module): d.target.module for d, _ in pruning}.values():
            if isinstance(mod, nn.Module):
                self.saved.append((mod, _snapshot(mod)))
        pruning.prune(record_history=False)
        return kept

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
    scan: Scan,
    todo: list,
    store: list[dict[str, torch.Tensor]] | None,
    chunks: Chunks,
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
                for row in _exact(scan, replica, target, ratios, store, chunks, cancel):
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
