"""A latency target for transformers, met as measured: per-token decode time for causal LMs
(``--target-latency 0.6`` = 60 % of the original's time per token, or ``300tok/s``), prefill
time for encoders.

There is no lookup-table predictor for transformers yet, and the time of a small decoder is
far from proportional to its parameters (per-token overhead in Python and the KV cache), so
the target is reached as :mod:`studio.core.latency.target` reaches CNN targets: candidates
allocated to a parameter fraction (by sensitivity with a scan, else uniformly) are pruned
(structure only) and timed against the original in turns
(:func:`studio.core.latency.decode.compare_lm_latency`), and the fraction is corrected by
interpolating between the candidates around the target, until one lands within
:data:`GOAL` of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.latency.decode import compare_lm_latency
from studio.core.models.loaded import LoadedModel
from studio.core.plan.plan import PruningPlan
from studio.core.plan.transformer import allocate_transformer
from studio.core.prune.engine import prune
from studio.core.scan.heads import HeadScan

GOAL = 0.05
ROUNDS = 6
NEW_TOKENS = 16
LOWEST = 0.15  # the smallest parameter fraction tried


@dataclass
class LMCandidate:
    params: float
    plan: PruningPlan
    measured: float  # time as a fraction of the original's, side by side
    before_ms: float
    after_ms: float


def parse_target(text: str) -> tuple[str, float]:
    """``0.6`` / ``0.6x`` (a fraction of the original's time) or ``300tok/s``."""
    value = str(text).strip().lower().replace(" ", "")
    try:
        if value.endswith(("tok/s", "tokens/s")):
            number = float(value.split("tok")[0])
            if number <= 0:
                raise ValueError
            return "tokens_per_s", number
        number = float(value.removesuffix("x"))
    except ValueError:
        raise StudioError(
            f"bad --target-latency {text!r}: a fraction of the original's time like 0.6, or a "
            "decoding speed like 300tok/s"
        ) from None
    if not 0.0 < number < 1.0:
        raise StudioError(f"--target-latency {text} must be a fraction between 0 and 1")
    return "fraction", number


def reach_lm_latency(
    model: LoadedModel,
    target: str,
    strategy: str = "sensitivity",
    scan: HeadScan | None = None,
    base: PruningPlan | None = None,
    threads: int = 1,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> tuple[PruningPlan, LMCandidate]:
    """The plan whose measured time per token (prefill for encoders) is within GOAL of
    ``target``, and how it measured."""
    kind, value = parse_target(target)
    decoder = model.task == "causal-lm"
    if kind == "tokens_per_s" and not decoder:
        raise StudioError("tokens per second is a decoder's speed: give a fraction for encoders")
    prompt = int(model.input_shape[-1])
    new_tokens = NEW_TOKENS if decoder else 0

    def measure(plan: PruningPlan, params: float) -> LMCandidate:
        pruned = prune(model, plan)
        cmp = compare_lm_latency(
            model.module, pruned.module, prompt_len=prompt, new_tokens=new_tokens,
            threads=threads, cancel=cancel,
        )  # fmt: skip
        before = cmp.before.decode_ms if decoder else cmp.before.prefill_ms
        after = cmp.after.decode_ms if decoder else cmp.after.prefill_ms
        assert before is not None and after is not None
        return LMCandidate(params, plan, after / before, before, after)

    tried: list[LMCandidate] = []
    goal = value
    params = value if kind == "fraction" else 0.7
    for i in range(ROUNDS):
        check(cancel)
        report(progress, i / ROUNDS, f"candidate {i + 1}: {params:.0%} of the parameters")
        try:
            plan = allocate_transformer(model, params, strategy, scan, base=base)
        except StudioError:  # below what pruning heads and neurons can reach
            if not tried:
                raise
            break
        candidate = measure(plan, params)
        tried.append(candidate)
        if kind == "tokens_per_s" and i == 0:  # now the original's speed is known
            original = 1000.0 / candidate.before_ms
            if value <= original:
                raise StudioError(
                    f"the original already decodes {original:.0f} tokens/s here: ask for more"
                )
            goal = original / value
        if abs(candidate.measured - goal) <= GOAL * goal:
            break
        params = _next_fraction(tried, goal)
        if params is None:
            break
    best = min(tried, key=lambda c: (c.measured > goal * (1 + GOAL), abs(c.measured - goal)))
    if best.measured > goal * (1 + GOAL):
        raise StudioError(
            f"no plan reached {goal:.0%} of the original's time here: the fastest measured "
            f"{min(c.measured for c in tried):.0%} at {min(c.params for c in tried):.0%} of the "
            "parameters (per-token overhead does not shrink with the layers)"
        )
    target_info = {
        "latency": goal,
        "measured": round(best.measured, 4),
        "metric": "decode ms/token" if decoder else "prefill ms",
        "threads": threads,
        "allocate": strategy,
        "params": round(best.params, 4),
    }
    if kind == "tokens_per_s":
        target_info["tokens_per_s"] = value
    report(progress, 1.0, "done")
    return replace(best.plan, target=target_info), best


def _next_fraction(tried: list[LMCandidate], goal: float) -> float | None:
    """Interpolate the parameter fraction between the candidates around the goal."""
    points = sorted((c.params, c.measured) for c in tried)
    xs = np.array([p for p, _ in points])
    ys = np.array([m for _, m in points])
    below = [(p, m) for p, m in points if m <= goal]
    above = [(p, m) for p, m in points if m > goal]
    if below and above:
        (p0, m0), (p1, m1) = max(below, key=lambda t: t[0]), min(above, key=lambda t: t[0])
        nxt = p0 + (goal - m0) * (p1 - p0) / (m1 - m0) if m1 != m0 else (p0 + p1) / 2
    elif above:  # everything too slow: prune more, in proportion
        p, m = min(above, key=lambda t: t[0])
        nxt = p * goal / m
        if p <= LOWEST + 1e-9:
            return None
    else:  # everything fast enough: prune less
        p, m = max(below, key=lambda t: t[0])
        nxt = min(0.98, p * goal / max(m, 1e-6))
    nxt = float(np.clip(nxt, LOWEST, 0.98))
    if np.min(np.abs(xs - nxt)) < 0.005:
        return None
    del ys
    return nxt
