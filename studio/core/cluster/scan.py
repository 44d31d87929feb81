"""Sensitivity scans on Ray: each work unit (one target and its ratios) is a Ray task.

The model and the data go into Ray's object store once; every worker is a Ray actor that
builds its own copy from there, prepares the scan once (targets, channel scores, the unpruned
outputs and, for exact scans, the activations it reuses) and then measures the units it is
given with the same code the in-process scan runs (:meth:`SensitivityScan.measure`), so the
rows are the same numbers. With fewer than two targets a worker, targets' ratios are split
across units (:func:`split_units`) so that more workers still help. Units are handed out one
at a time to whichever worker is free and their rows come back as they finish, through
:meth:`SensitivityScan.run`: the heatmap fills live, the cache is written row by row, and a
scan stopped for any reason resumes from it.

Cancel kills the workers (their running units end with them). A worker that dies or a lost
connection ends the scan with one line; the rows finished before it stay in the cache.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.core.cluster.connection import Cluster, require_ray
from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.scan.sensitivity import SensitivityScan, register_strategy
from studio.core.scan.types import ScanRow

POLL_SECONDS = 0.2  # how often the driver looks at the cancel token while units run


@dataclass
class RayScanStats:
    """What the scan cost on the cluster: for the progress line and the scaling benchmark."""

    where: str = ""
    workers: int = 0
    object_bytes: int = 0  # model + data put into the object store
    startup_seconds: list[float] = field(default_factory=list)  # per worker, until ready
    units: list[tuple[str, int, float]] = field(default_factory=list)  # (target, rows, s)
    wall_seconds: float = 0.0


class ScanWorker:
    """A Ray actor: one copy of the model and data, one prepared scan, one torch thread."""

    def __init__(self, model: Any, data: Any, settings: Any) -> None:
        start = time.perf_counter()
        torch.set_num_threads(_assigned_cpus())
        self.scan = SensitivityScan(model, data, settings, use_cache=False, workers=1)
        self.scan.prepare()
        torch.set_num_threads(_assigned_cpus())  # prepare() takes every core of the node
        self.store = self.scan._store  # exact: activations reused by every unit
        assert self.scan.report is not None
        self.targets = {t.name: t for t in self.scan.report.targets}
        self.startup = time.perf_counter() - start

    def hello(self) -> tuple[str, int, float]:
        return socket.gethostname(), os.getpid(), self.startup

    def unit(self, name: str, ratios: list[float]) -> tuple[list[dict], float]:
        start = time.perf_counter()
        self.scan._store = self.store
        rows = [r.to_dict() for r in self.scan.measure([(self.targets[name], ratios)], None)]
        return rows, time.perf_counter() - start


def ray_rows(
    scan: SensitivityScan,
    todo: list,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[ScanRow]:
    """Rows of ``todo`` [(target, ratios)] measured by workers on Ray, as they finish."""
    ray = require_ray()
    assert scan.ray_address is not None
    cluster = Cluster.connect(scan.ray_address)
    info = cluster.refresh()
    stats = scan.ray_stats = RayScanStats(where=info.where())
    started = time.monotonic()
    # one CPU a worker: more workers than the cluster has CPUs would wait for CPUs that
    # never free up (each worker is handed a unit as soon as it is made)
    wanted = min(scan.workers if scan.workers_given else 10**6, max(1, int(info.cpus)))
    todo = split_units(todo, wanted)
    count = max(1, min(wanted, len(todo)))
    stats.workers = count
    report(progress, 0.0, f"starting {count} Ray worker{'s' if count > 1 else ''}: {stats.where}")
    model_ref, data_ref = ray.put(scan.model), ray.put(scan.data)
    stats.object_bytes = _object_bytes(scan)
    remote = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(ScanWorker)
    created = time.monotonic()
    actors = [remote.remote(model_ref, data_ref, scan.settings) for _ in range(count)]
    pending = deque(todo)
    running: dict[Any, tuple[Any, str | None]] = {}  # task -> (actor, target; None: hello)

    def give(actor: Any) -> None:
        target, ratios = pending.popleft()
        running[actor.unit.remote(target.name, list(ratios))] = (actor, target.name)

    try:
        for actor in actors:  # a worker's hello returns once it has built its copy
            running[actor.hello.remote()] = (actor, None)
            give(actor)
        while running:
            ready = _wait_for(ray, list(running), cancel, scan.ray_address)
            for task in ready:
                actor, name = running.pop(task)
                if name is None:  # process start, imports, copy of the objects, prepare
                    _get(ray, task, scan.ray_address, starting=True)
                    stats.startup_seconds.append(time.monotonic() - created)
                    continue
                rows, seconds = _get(ray, task, scan.ray_address)
                stats.units.append((name, len(rows), seconds))
                if pending:
                    give(actor)
                for row in rows:
                    yield ScanRow(**row)
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        stats.wall_seconds = time.monotonic() - started


def split_units(todo: list, workers: int) -> list:
    """Units of ``todo`` [(target, ratios)]: one a target, or, when there are fewer than two
    targets a worker, each target's ratios cut into consecutive runs so that there are (ratios
    allowing) twice as many units as workers; a worker keeps the activations it reuses, so a
    smaller unit costs little more than its rows."""
    if not todo or len(todo) >= 2 * workers:
        return list(todo)
    pieces = -(-2 * workers // len(todo))  # ceil
    units = []
    for target, ratios in todo:
        ratios = list(ratios)
        n = min(pieces, len(ratios))
        bounds = [round(i * len(ratios) / n) for i in range(n + 1)]
        units.extend((target, ratios[a:b]) for a, b in zip(bounds, bounds[1:]))
    return units


def _wait_for(ray: Any, tasks: list, cancel: CancelToken | None, address: str) -> list:
    """The tasks of ``tasks`` that have finished, once at least one has; checks ``cancel``."""
    while True:
        check(cancel)
        try:
            ready, _ = ray.wait(tasks, num_returns=1, timeout=POLL_SECONDS)
        except Exception as exc:
            raise StudioError(f"lost the connection to Ray at {address}: {_first(exc)}") from None
        if ready:
            return ready


def _get(ray: Any, task: Any, address: str, starting: bool = False) -> Any:
    from ray import exceptions as rx

    try:
        return ray.get(task)
    except (rx.RayActorError, rx.WorkerCrashedError, rx.ObjectLostError, rx.NodeDiedError) as exc:
        cause = getattr(exc, "cause", None) or exc
        what = "could not start" if starting else "was lost"
        raise StudioError(
            f"a Ray worker {what}: {_first(cause)}; finished rows are in the cache, "
            "run the scan again to go on"
        ) from None
    except rx.RayTaskError as exc:
        raise StudioError(f"a scan unit failed on Ray: {_first(exc.cause or exc)}") from None
    except rx.RayError as exc:
        raise StudioError(f"lost the connection to Ray at {address}: {_first(exc)}") from None


def _object_bytes(scan: SensitivityScan) -> int:
    """Bytes of the model and data as pickled for the object store (what each worker reads)."""
    import pickle

    try:
        return sum(len(pickle.dumps(obj, protocol=5)) for obj in (scan.model, scan.data))
    except Exception:  # a module pickle cannot handle; Ray's cloudpickle may still manage
        return 0


def _assigned_cpus() -> int:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        return max(1, int(cpus))
    except Exception:
        return 1


def _first(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


register_strategy("ray", ray_rows)
