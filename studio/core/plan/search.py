"""Finding the member of a family of plans that meets a target: bisection along the family,
the scan that latency targets need (latency is not monotone in channels), mixing two
neighbouring members, rounding channel counts to multiples, and snapping ratios to 6 decimals.
:func:`studio.core.plan.allocate.allocate` builds the families and calls :func:`solve`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from studio.core.errors import StudioError
from studio.core.plan.costs import CostModel

TOLERANCE = 0.02  # the achieved fraction lands within this of the target (of the original)
SCAN = 1000  # a latency target tries this many members of a family at most
STEPS = 64

Family = Callable[[float], np.ndarray]  # parameter -> ratio of every target, in cost order


class LatencyCost(Protocol):
    """What allocation to a latency target needs of an estimator (the latency stage's
    ``LatencyPredictor`` is one; the plan stage never imports it): the cost model it was built
    for, its estimate of a plan's latency, the unpruned model's, and its settings."""

    cost: CostModel
    original_ms: float
    runtime: str
    batch: int
    threads: int

    def predict_ms(self, r: np.ndarray) -> float:  # r: the cost model's ratio vector
        ...


def latency_fraction(
    cost: CostModel, predictor: LatencyCost | None
) -> Callable[[np.ndarray], float]:
    """Predicted latency as a fraction of the unpruned model's, for ratios in cost order."""
    if predictor is None:
        raise StudioError("a latency target needs a latency predictor for the model")
    if cost.method != "structured":
        raise StudioError(
            f"a latency target needs structured pruning: {cost.method} zeros do not make a "
            "dense runtime faster"
        )
    order = {n: i for i, n in enumerate(predictor.cost.names)}
    if set(order) != set(cost.names):
        raise StudioError("the latency predictor was built for another model")
    index = np.array([order[n] for n in cost.names])
    original = predictor.original_ms or 1.0

    def fraction(r: np.ndarray) -> float:
        mapped = np.zeros(len(index))
        mapped[index] = r
        return predictor.predict_ms(mapped) / original

    return fraction


def restrict(base: np.ndarray, free: np.ndarray, ratios: Family, top: float) -> Family:
    """Locked/ignored targets at their base ratio, free ones from ``ratios``, at most ``top``."""
    return lambda x: np.where(free, np.minimum(ratios(x), top), base)


def solve(
    family: Family,
    top: float,
    fraction: Callable[[np.ndarray], float],
    target: float,
    kind: str,
    strategy: str,
    coarse: bool = False,
) -> np.ndarray:
    """The family member meeting ``target`` with the least pruning, within TOLERANCE (or, for
    a ``coarse`` family whose steps are whole stairs of channels, the first that meets it)."""
    least, most = fraction(family(0.0)), fraction(family(top))
    if most > target + TOLERANCE:
        raise StudioError(
            f"{strategy} allocation cannot bring {kind} below {most:.1%} of the original "
            f"(the per-layer cap, locked and ignored layers limit it); target {target:.1%}"
        )
    if least < target - TOLERANCE:
        raise StudioError(
            f"locked ratios alone already bring {kind} to {least:.1%} of the original, "
            f"below the target {target:.1%}"
        )
    if least <= target:
        return family(0.0)
    lo, hi = 0.0, top  # fraction(lo) > target >= fraction(hi)
    if kind == "latency":  # not monotone in channels (layouts): scan the family first
        landed, lo, hi = scan_family(family, top, fraction, target)
        if landed is not None:
            return landed
    for _ in range(STEPS):
        mid = 0.5 * (lo + hi)
        if fraction(family(mid)) <= target:
            hi = mid
        else:
            lo = mid
    if target - fraction(family(hi)) <= TOLERANCE:
        return family(hi)
    # one step of the family jumps too far: move targets from the lower step to the higher one
    # in model order, and take the first mix that meets the target
    r_over, r_met = family(lo), family(hi)
    differ = np.flatnonzero(r_over != r_met)

    def mix(j: int) -> np.ndarray:
        r = r_over.copy()
        r[differ[:j]] = r_met[differ[:j]]
        return r

    a, b = 0, differ.size  # fraction(mix(a)) > target >= fraction(mix(b))
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (a, mid) if fraction(mix(mid)) <= target else (mid, b)
    met, over = fraction(mix(b)), fraction(mix(a))
    if target - met <= TOLERANCE:
        return mix(b)
    if over - target <= TOLERANCE:
        return mix(a)
    if kind == "latency" or coarse:  # latency is not monotone in channels; stairs are coarse:
        return mix(b)  # meet the target, prune a little more
    raise StudioError(
        f"no {strategy} allocation lands within {TOLERANCE:.0%} of {target:.1%} of the {kind}: "
        f"the nearest are {over:.1%} and {met:.1%} (one step of a large layer)"
    )


def scan_family(
    family: Callable[[float], np.ndarray],
    top: float,
    fraction: Callable[[np.ndarray], float],
    target: float,
) -> tuple[np.ndarray | None, float, float]:
    """The least pruning in ``family`` that lands within TOLERANCE of ``target``, or None and
    the neighbouring members (``lo``, ``hi``) across the target whose ``hi`` comes closest to
    it from below, to bisect and mix between. At most SCAN members are tried (every step of a
    family of fewer steps)."""
    xs = np.arange(0.0, top + 1.0) if 1 <= top <= SCAN else np.linspace(0.0, top, SCAN + 1)
    xs = np.unique(np.append(xs[xs <= top], top))  # the last member is always tried
    values = []
    for x in xs:
        ratios = family(float(x))
        values.append(fraction(ratios))
        if abs(values[-1] - target) <= TOLERANCE:
            return ratios, 0.0, 0.0
    pairs = [i for i in range(len(xs) - 1) if values[i] > target >= values[i + 1]]
    i = max(pairs, key=lambda j: values[j + 1], default=len(xs) - 2)
    return None, float(xs[i]), float(xs[i + 1])


def round_channels(cost: CostModel, ratios: np.ndarray, multiple: int) -> np.ndarray:
    """Structured ratios changed so that every target keeps a multiple of ``multiple``
    channels (the nearest; at least ``multiple``), as 6-decimal ratios. Vectorised CPU kernels
    (ONNX Runtime's NCHWc layout, oneDNN, GPU tensor cores) run channel counts that are not
    multiples of 8 or 16 on slower paths, so fewer MACs need not mean faster without this.
    Targets with fewer channels than ``multiple``, or removed a head at a time, are kept as
    they are; the map from ratio to channels is monotone, so allocation can bisect through it."""
    n = cost.steps()
    unit = cost.unit_sizes()
    removed = np.clip(np.floor(n * ratios + 1e-9), 0, n - 1)
    kept = n - removed
    rounded = np.maximum(multiple, multiple * np.round(kept / multiple))
    eligible = (unit == 1) & (n >= multiple)
    kept = np.where(eligible, np.minimum(rounded, n), kept)
    count = n - kept
    return np.where(count > 0, np.ceil(count / n * 1e6 - 1e-6) / 1e6, 0.0)


def rounded(cost: CostModel, family: Family, free: np.ndarray, multiple: int) -> Family:
    """``family`` with the free targets' channel counts rounded to multiples of ``multiple``."""
    return lambda x: np.where(free, round_channels(cost, family(x), multiple), family(x))


def snap(cost: CostModel, ratios: np.ndarray) -> np.ndarray:
    """Each ratio as the smallest 6-decimal number removing the same count of channels or
    weights (recipes keep 6 decimals; a ratio like 1/3 rounded down would remove one less)."""
    if cost.method in ("nm", "blocks"):
        return ratios
    n = cost.steps()
    count = np.clip(np.floor(n * ratios + 1e-9), 0, n)
    return np.where(count > 0, np.ceil(count / n * 1e6 - 1e-6) / 1e6, 0.0)
