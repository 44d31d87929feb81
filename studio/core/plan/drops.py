"""Predicted quality drop of a plan, read off the sensitivity scan's curves.

Each target's curve is its measured drop (:meth:`ScanReport.drop`) against ratio with a drop
of 0 at ratio 0, linear between measured ratios and beyond the last one along the last
segment's slope, made monotone (a running maximum: pruning more never predicts less drop).
The drop of a whole plan is the sum of its targets' drops: the usual first-order assumption
that layers' losses add up, which overestimates when drops saturate and underestimates when
damage compounds; it ranks plans well and is what the sensitivity allocation minimises.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.core.errors import StudioError
from studio.core.scan.types import ScanReport


@dataclass(frozen=True)
class DropCurves:
    """Monotone drop curves of several targets on one ratio grid ``xs`` (``xs[0] == 0``)."""

    names: list[str]
    xs: np.ndarray  # (P,) increasing ratios, first 0
    ys: np.ndarray  # (T, P) drops, ys[:, 0] == 0, non-decreasing along each row

    def at(self, r: np.ndarray) -> np.ndarray:
        """Drop of each target at its ratio ``r[i]`` (linear, extrapolated past the grid)."""
        xs, ys = self.xs, self.ys
        if xs.size < 2:
            return np.zeros(len(self.names))
        j = np.clip(np.searchsorted(xs, r, side="right") - 1, 0, xs.size - 2)
        rows = np.arange(len(self.names))
        y0, y1 = ys[rows, j], ys[rows, j + 1]
        return np.maximum(0.0, y0 + (r - xs[j]) / (xs[j + 1] - xs[j]) * (y1 - y0))

    def inverse(self, level: float, cap: np.ndarray) -> np.ndarray:
        """Largest ratio (at most ``cap``) whose drop is at most ``level``, per target."""
        xs, ys = self.xs, self.ys
        if xs.size < 2:
            return np.array(cap, float)
        j = (ys <= level).sum(axis=1) - 1  # rows are monotone: the last grid point <= level
        rows = np.arange(len(self.names))
        last = xs.size - 1
        jn = np.minimum(j + 1, last)
        rise = np.where(j < last, ys[rows, jn] - ys[rows, j], ys[:, -1] - ys[:, -2])
        run = np.where(j < last, xs[jn] - xs[j], xs[-1] - xs[-2])
        with np.errstate(divide="ignore", invalid="ignore"):
            r = xs[j] + np.where(rise > 0, (level - ys[rows, j]) / rise * run, np.inf)
        return np.minimum(r, cap)


_CACHE: dict[int, tuple[weakref.ref, int, str, DropCurves]] = {}


def drop_curves(report: ScanReport, metric: str | None = None) -> DropCurves:
    """The report's curves (targets with at least one measured ratio), cached per report."""
    metric = metric or report.settings.metric
    hit = _CACHE.get(id(report))
    if hit and hit[0]() is report and hit[1] == len(report.rows) and hit[2] == metric:
        return hit[3]
    names, ratios, grid = report.matrix(metric)
    xs = np.array([0.0, *ratios])
    kept, rows = [], []
    for name, cells in zip(names, grid):
        ok = ~np.isnan(cells)
        if not ok.any():
            continue
        px, py = np.array([0.0, *np.asarray(ratios)[ok]]), np.array([0.0, *cells[ok]])
        y = np.interp(xs, px, py)
        beyond = xs > px[-1]
        if beyond.any():  # past the last measured ratio: along the last segment
            slope = (py[-1] - py[-2]) / (px[-1] - px[-2])
            y[beyond] = py[-1] + slope * (xs[beyond] - px[-1])
        kept.append(name)
        rows.append(np.maximum.accumulate(y))
    curves = DropCurves(kept, xs, np.array(rows).reshape(len(kept), xs.size))
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[id(report)] = (weakref.ref(report), len(report.rows), metric, curves)
    return curves


def predicted_drop(
    ratios: Mapping[str, float], report: ScanReport, metric: str | None = None
) -> tuple[float, dict[str, float]]:
    """(total, per target) drop predicted from the scan, in :meth:`ScanReport.drop` units.

    Targets the scan did not measure are left out; the total is the sum of the per-target
    drops (first-order: drops are assumed to add up)."""
    curves = drop_curves(report, metric)
    get = ratios.get
    r = np.fromiter((get(n, 0.0) for n in curves.names), float, len(curves.names))
    drops = curves.at(r)
    return float(drops.sum()), dict(zip(curves.names, drops.tolist()))


def load_scan(path: str | Path) -> ScanReport:
    """Read the JSON that ``studio scan --out x.json`` writes, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"scan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise StudioError(f"cannot read scan file {path.name}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise StudioError(f"scan file {path.name} is not valid JSON: {exc}") from None
    return ScanReport.from_dict(data, f"scan file {path.name}")
