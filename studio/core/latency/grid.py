"""The lookup table's grids: which ONNX Runtime kernel (layout regime) a layer runs at given
channel counts, which counts to micro-benchmark in each regime, and bilinear interpolation."""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from studio.core.latency.layout import conv_runs_nchwc, nchwc_block

GRID = 4  # channel counts measured per dimension (ends included)
BLOCK = nchwc_block()


def regime(op: str, c_in: float, c_out: float) -> str:
    """Which kernel ONNX Runtime's CPU provider runs (its NCHWc transformer's rule,
    :func:`studio.core.latency.layout.conv_runs_nchwc`): ``c`` NCHWc (input and output
    channels padded to whole blocks), ``d`` NCHWc output from a plain input of fewer channels
    than a block, ``n`` plain NCHW (im2col and GEMM at the exact counts), ``l`` a linear
    layer."""
    if op == "linear":
        return "l"
    if op == "dwconv":
        return "c" if conv_runs_nchwc(int(c_out), int(c_out), int(c_out), BLOCK) else "n"
    if not conv_runs_nchwc(int(c_in), int(c_out), 1, BLOCK):
        return "n"
    return "d" if c_in < BLOCK else "c"


def pad(c: float) -> int:
    return -(-int(c) // BLOCK) * BLOCK


def coordinates(op: str, kind: str, c_in: float, c_out: float) -> tuple[float, float]:
    """Where a layer with these counts lies in its regime's grid: NCHWc kernels cost the same
    at every count that pads to the same blocks."""
    x = 0.0 if op == "dwconv" else float(c_in)
    if kind == "c":
        return (float(pad(c_in)) if x else 0.0), float(pad(c_out))
    if kind == "d":
        return x, float(pad(c_out))
    return x, float(c_out)


def spread(lo: float, hi: float, count: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(lo, hi, max(1, min(count, int(hi - lo) + 1)))))


def plain(top: int) -> np.ndarray:
    """Channel counts of the plain regime (not a multiple of 4, at least a block) up to
    ``top``."""
    values = spread(BLOCK + 1, max(BLOCK + 1, top - 1), GRID + 1)
    return np.unique(np.where(values % 4 == 0, values - 1, values))


def blocks(top: int) -> np.ndarray:
    return spread(1, np.ceil(top / BLOCK), GRID) * BLOCK


def grids(op: str, c_in: int, c_out: int, fixed_in: bool, fixed_out: bool) -> dict:
    """The channel counts to measure in each regime the layer can reach under pruning."""

    def outs(kind: str) -> np.ndarray:
        if fixed_out:
            return np.array([coordinates(op, kind, c_in, c_out)[1]])
        return spread(1, c_out, GRID) if kind in ("n", "l") else blocks(c_out)

    if op == "linear":
        ins = np.array([float(c_in)]) if fixed_in else spread(1, c_in, GRID)
        return {"l": (ins, outs("l"))}
    zero = np.array([0.0])
    if op == "dwconv":
        if fixed_out:
            kind = regime(op, c_in, c_out)
            return {kind: (zero, outs(kind))}
        found = {"c": (zero, blocks(c_out))}
        if c_out > BLOCK + 1:
            found["n"] = (zero, plain(c_out))
        return found
    if fixed_in:
        kind = regime(op, c_in, c_out)
        return {kind: (np.array([coordinates(op, kind, c_in, c_out)[0]]), outs(kind))}
    found = {"d": (np.array([1.0, BLOCK - 1.0]), outs("d"))}
    if c_in >= BLOCK:
        found["c"] = (blocks(c_in), outs("c"))
    if c_in > BLOCK + 1:
        found["n"] = (plain(c_in), outs("n"))
    return found


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


def linear(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear interpolation of ``ys`` over ``xs`` (extrapolated at the ends)."""
    i, t = segment(xs, x)
    return ys[i] if len(xs) == 1 else ys[i] * (1 - t) + ys[i + 1] * t
