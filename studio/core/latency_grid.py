"""The lookup table's grids: which ONNX Runtime kernel (layout regime) a layer runs at given
channel counts, which counts to micro-benchmark in each regime, and bilinear interpolation."""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from studio.core.latency_micro import NCHWC_BLOCK

GRID = 4  # channel counts measured per dimension (ends included)
BLOCK = NCHWC_BLOCK


def regime(op: str, c_in: float, c_out: float) -> str:
    """Which kernel ONNX Runtime's CPU provider runs (its NCHWc transformer's rules, and the
    4-wide vectors of its plain kernels): ``c`` NCHWc blocks (output channels padded to 8),
    ``d`` NCHWc output from a plain input of fewer than 8 channels, ``q`` plain NCHW with
    input channels (depthwise: output channels) a multiple of 4, ``n`` plain NCHW otherwise,
    ``l`` a linear layer."""
    if op == "linear":
        return "l"
    channels = c_out if op == "dwconv" else c_in
    if op == "conv" and c_in < BLOCK:
        return "d"
    if channels % BLOCK == 0:
        return "c"
    return "q" if channels % 4 == 0 else "n"


def spread(lo: float, hi: float, count: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(lo, hi, max(1, min(count, int(hi - lo) + 1)))))


def plain(top: int, kind: str) -> np.ndarray:
    """Channel counts of regime ``n`` (not a multiple of 4) or ``q`` (4 mod 8) up to ``top``."""
    if kind == "q":
        ks = spread(1, max(1, (top - 4) // BLOCK), GRID)
        return ks * BLOCK + 4
    values = spread(BLOCK + 1, max(BLOCK + 1, top - 1), GRID + 1)
    return np.unique(np.where(values % 4 == 0, values - 1, values))


def grids(op: str, c_in: int, c_out: int, fixed_in: bool, fixed_out: bool) -> dict:
    """The channel counts to measure in each regime the layer can reach under pruning."""

    def outs(kind: str) -> np.ndarray:
        if fixed_out:
            return np.array([float(c_out)])
        if kind in ("n", "q"):
            return spread(1, c_out, GRID)
        return spread(1, np.ceil(c_out / BLOCK), GRID) * BLOCK

    if op == "linear":
        ins = np.array([float(c_in)]) if fixed_in else spread(1, c_in, GRID)
        return {"l": (ins, outs("l"))}
    zero = np.array([0.0])
    if op == "dwconv":
        if fixed_out:
            return {regime(op, c_in, c_out): (zero, np.array([float(c_out)]))}
        grids = {"c": (zero, spread(1, np.ceil(c_out / BLOCK), GRID) * BLOCK)}
        if c_out > BLOCK + 1:
            grids["n"] = (zero, plain(c_out, "n"))
        if c_out > BLOCK + 4:
            grids["q"] = (zero, plain(c_out, "q"))
        grids["q"] = grids.get("q", (zero, np.array([4.0])))
        return grids
    if fixed_in:
        kind = regime(op, c_in, c_out)
        return {kind: (np.array([float(c_in)]), outs(kind))}
    grids = {"d": (np.array([1.0, BLOCK - 1.0]), outs("d"))}
    if c_in >= BLOCK:
        grids["c"] = (spread(1, c_in // BLOCK, GRID) * BLOCK, outs("c"))
    if c_in > BLOCK + 1:
        grids["n"] = (plain(c_in, "n"), outs("n"))
    if c_in > BLOCK + 4:
        grids["q"] = (plain(c_in, "q"), outs("q"))
    return grids


def bilinear(
    xs: list[float], ys: list[float], table: list[list[float]], x: float, y: float
) -> float:
    i, tx = segment(xs, x)
    j, ty = segment(ys, y)
    row = table[i]
    low = row[j] if len(ys) == 1 else row[j] * (1 - ty) + row[j + 1] * ty
    if len(xs) == 1:
        return low
    row = table[i + 1]
    high = row[j] if len(ys) == 1 else row[j] * (1 - ty) + row[j + 1] * ty
    return low * (1 - tx) + high * tx


def segment(xs: list[float], x: float) -> tuple[int, float]:
    """Index of the grid segment holding ``x`` and the position in it (extrapolating at the
    ends, so that fewer channels than the smallest measured still cost less)."""
    if len(xs) == 1:
        return 0, 0.0
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    lo, hi = xs[i], xs[i + 1]
    return i, (x - lo) / (hi - lo)
