"""Sensitivity allocation on the staircase of channel counts a runtime runs fast.

With a channel multiple ``m`` (8 or 16 on CPUs, 8 for tensor cores), a structured target may
keep only multiples of ``m`` (or all its channels). Rounding an equal-drop plan to those counts
after allocating moves each target up or down a whole stair whatever that costs: on the demo at
16 channels that lost 25 points of accuracy against 8. Here the stairs are allocated directly:
starting from the unpruned model, each move takes the stair (or a few stairs at once, so that a
curve that rises late is not hidden behind a costly first stair) of the target whose predicted
drop grows least per MAC removed, until every target is at its cap. Every stair passed is a
member of a family of plans (a move of several stairs of a large group would otherwise jump
over a target: resnet56 landed at 42 % of the MACs for 50 %) that
:func:`studio.core.plan.search.solve` bisects or scans for a parameter, MAC or latency target
like any other.

Targets that cannot follow the multiple (fewer channels than ``m``, or removed a head at a time)
move a single channel (or head) per stair.
"""

from __future__ import annotations

import math

import numpy as np

from studio.core.plan.costs import CostModel
from studio.core.plan.drops import DropCurves
from studio.core.plan.search import Family

LOOKAHEAD = 4  # a move may take up to this many stairs of one target at once


def stairs(n: int, unit: int, multiple: int, cap: float) -> np.ndarray:
    """Allowed kept counts of a target with ``n`` steps, from all of them down: multiples of
    ``multiple`` (single steps where it cannot follow), removing at most ``cap`` of them."""
    least = max(1, math.ceil(n * (1.0 - cap) - 1e-9))
    if unit == 1 and n >= multiple and multiple > 1:
        kept = [n] + [k for k in range((n - 1) // multiple * multiple, 0, -multiple)]
    else:
        kept = list(range(n, 0, -1))
    return np.array([k for k in kept if k >= least] or [n], int)


def ratio_of(n: int, kept: np.ndarray) -> np.ndarray:
    """6-decimal ratios removing exactly ``n - kept`` steps (rounded up, as snap writes them)."""
    count = n - kept
    return np.where(count > 0, np.ceil(count / n * 1e6 - 1e-6) / 1e6, 0.0)


def staircase(
    cost: CostModel,
    base: np.ndarray,
    free: np.ndarray,
    curves: DropCurves,
    multiple: int,
    cap: float,
    weights: np.ndarray | None = None,
) -> tuple[Family, float]:
    """The greedy sequence of stair moves as a family (parameter: moves made) and its top.
    ``weights`` (per layer of ``cost.rows``: its measured time per MAC) make a move's saving
    the time it removes rather than its MACs: drop per millisecond saved."""
    n, unit = cost.steps().astype(int), cost.unit_sizes().astype(int)
    row_of = {name: i for i, name in enumerate(curves.names)}
    ladders: list[np.ndarray] = []  # ratios of each stair, unpruned first
    drops: list[np.ndarray] = []
    for i, name in enumerate(cost.names):
        if not free[i] or name not in row_of:
            ladders.append(np.array([base[i] if not free[i] else 0.0]))
            drops.append(np.zeros(1))
            continue
        ratios = ratio_of(n[i], stairs(n[i], unit[i], multiple, cap))
        ladders.append(ratios)
        row = curves.ys[row_of[name]][None, :].repeat(ratios.size, axis=0)
        drops.append(DropCurves([name] * ratios.size, curves.xs, row).at(ratios))
    r = np.array([ladder[0] for ladder in ladders])
    position = np.zeros(len(ladders), int)
    states = [r.copy()]
    macs = float(cost.macs_matrix(r[None, :], weights)[0])
    while True:
        moves = [
            (i, j)
            for i, ladder in enumerate(ladders)
            for j in range(position[i] + 1, min(position[i] + 1 + LOOKAHEAD, ladder.size))
        ]
        if not moves:
            break
        trial = np.repeat(r[None, :], len(moves), axis=0)
        for k, (i, j) in enumerate(moves):
            trial[k, i] = ladders[i][j]
        saved = macs - cost.macs_matrix(trial, weights)
        grown = np.array([drops[i][j] - drops[i][position[i]] for i, j in moves])
        useful = saved > 1e-9 * max(macs, 1.0)
        if not useful.any():
            break
        score = np.where(useful, grown / np.maximum(saved, 1.0), np.inf)
        # least drop per MAC; among equals (zero-drop stairs) the one that removes most
        best = min(np.flatnonzero(useful), key=lambda k: (score[k], -saved[k]))
        i, j = moves[best]
        for step in range(position[i] + 1, j + 1):  # every stair of the move is a member
            r[i] = ladders[i][step]
            states.append(r.copy())
        position[i] = j
        macs -= float(saved[best])
    table = np.array(states)
    top = float(len(states) - 1)

    def family(x: float) -> np.ndarray:
        return table[int(min(max(math.floor(x + 1e-9), 0), top))].copy()

    return family, top
