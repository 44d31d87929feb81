"""Words and matrices for a transformer's head/MLP/layer scan (``HeadScan``) in the
Sensitivity tab: axis titles, column labels ("kv0 (q0-3)" with grouped-query attention), what
the colour means, the hover text of a cell, and the scan's first grid before any row is in."""

from __future__ import annotations

import math

import numpy as np

from studio.core.models import hf_arch
from studio.core.models.evaluate import is_causal_lm
from studio.core.models.loaded import LoadedModel
from studio.core.scan.heads import MLP_RATIOS, HeadScan

HEADS, MLP = "Heads", "MLP"
VIEWS = (HEADS, MLP)
LAYER_AXIS = "whole layer skipped"


def unit(scan: HeadScan) -> str:
    """What the colours and bars measure."""
    return "perplexity increase" if scan.metric == "perplexity" else "cosine lost"


def empty_scan(model: LoadedModel) -> HeadScan:
    """The grid of a scan about to start (every cell NaN): rows and columns show at once."""
    blocks = hf_arch.blocks(model.module.hf)
    groups = [b.kv_heads for b in blocks]
    return HeadScan(
        layers=[b.name for b in blocks],
        groups=groups,
        heads_per_group=[b.heads // b.kv_heads for b in blocks],
        metric="perplexity" if is_causal_lm(model.module) else "cosine",
        baseline=math.nan,
        head_drop=np.full((len(blocks), max(groups, default=0)), np.nan),
        mlp_ratios=MLP_RATIOS,
        mlp_drop=np.full((len(blocks), len(MLP_RATIOS)), np.nan),
        layer_drop=np.full(len(blocks), np.nan),
    )


def group_heads(scan: HeadScan, group: int, layer: int | None = None) -> tuple[int, int] | None:
    """The first and last query head of a head group (of ``layer``, or of every layer when
    they agree); None when the layers differ."""
    sizes = {scan.heads_per_group[layer]} if layer is not None else set(scan.heads_per_group)
    if len(sizes) != 1:
        return None
    per = sizes.pop()
    return group * per, (group + 1) * per - 1


def columns(scan: HeadScan, view: str) -> tuple[list[str], str]:
    """Column labels and the axis title of ``view``."""
    if view == MLP:
        labels = [f"{r * 100:g}%" for r in scan.mlp_ratios]
        return labels, "MLP neurons switched off (least important first)"
    width = scan.head_drop.shape[1]
    if max(scan.heads_per_group, default=1) <= 1:
        return [f"h{g}" for g in range(width)], "attention head switched off"
    labels = []
    for g in range(width):
        heads = group_heads(scan, g)
        labels.append(f"kv{g} (q{heads[0]}-{heads[1]})" if heads else f"kv{g}")
    return labels, "head group switched off (a key/value head and its query heads)"


def matrix(scan: HeadScan, view: str) -> np.ndarray:
    """The drops of ``view`` as the user reads them (layers x columns, NaN where absent)."""
    return scan.shown(scan.mlp_drop if view == MLP else scan.head_drop)


def levels(values: np.ndarray) -> tuple[float, float]:
    """Colour levels from no change (pale) to the largest drop (dark): a unit whose removal
    helps a little is drawn as pale as one that changes nothing (its tooltip says by how
    much), so that the darkest cells are always the ones that hurt."""
    finite = values[np.isfinite(values)]
    high = float(finite.max()) if finite.size else 0.0
    return (0.0, high if high > 0.0 else 1e-9)


def log_width(scan: HeadScan) -> float:
    """Where the log scale turns linear: 1 % of the baseline perplexity (changes smaller than
    that look alike), or 0.001 of cosine."""
    if scan.metric != "perplexity" or not math.isfinite(scan.baseline):
        return 0.01 if scan.metric == "perplexity" else 1e-3
    return 0.01 * scan.baseline_shown


def _change(scan: HeadScan, shown: float) -> str:
    if math.isnan(shown):
        return "not measured yet"
    if scan.metric != "perplexity":
        return f"cosine lost {shown:.6g} (similarity to the unpruned model {1 - shown:.6g})"
    base = scan.baseline_shown
    return f"perplexity {base:.4f} → {base + shown:.4f} ({shown:+.6g})"


def cell_text(scan: HeadScan, view: str, layer: int, column: int) -> str:
    """The hover text of one cell: what is switched off and the exact change."""
    name = scan.layers[layer]
    if view == MLP:
        ratio = scan.mlp_ratios[column]
        what = f"{ratio:.1%} of the MLP neurons off, least important first"
    elif column >= scan.groups[layer]:
        return f"{name}: has {scan.groups[layer]} head groups, no group {column}"
    else:
        heads = group_heads(scan, column, layer)
        per = scan.heads_per_group[layer]
        what = (
            f"key/value head {column} and query heads {heads[0]}-{heads[1]} off"
            if per > 1 and heads
            else f"attention head {column} off"
        )
    return f"{name}: {what}\n{_change(scan, float(matrix(scan, view)[layer, column]))}"


def layer_text(scan: HeadScan, layer: int) -> str:
    """The hover text of a layer's bar: the drop with the whole layer skipped."""
    shown = float(scan.shown(scan.layer_drop)[layer])
    return f"{scan.layers[layer]}: whole layer skipped\n{_change(scan, shown)}"


def measured_layers(scan: HeadScan) -> int:
    return int(np.isfinite(scan.layer_drop).sum())


def summary(scan: HeadScan, data_name: str = "the data") -> str:
    """One line on a finished scan: its size, baseline (on ``data_name``, the text it was
    measured on) and the most sensitive head group."""
    base = (
        f"baseline perplexity {scan.baseline_shown:.3f} on {data_name}"
        if scan.metric == "perplexity"
        else "drops in cosine similarity to the unpruned model"
    )
    heads = scan.shown(scan.head_drop)
    worst = ""
    if np.isfinite(heads).any():
        i, g = (int(k) for k in np.unravel_index(np.nanargmax(heads), heads.shape))
        label = columns(scan, HEADS)[0][g]
        worst = f"; most sensitive head group: {scan.layers[i]} {label} ({heads[i, g]:+.4g})"
    took = "from the cache" if scan.cached else f"in {scan.seconds:.1f} s"
    return (
        f"Done: {len(scan.layers)} layers x {max(scan.groups, default=0)} head groups, "
        f"{len(scan.mlp_ratios)} MLP ratios and whole layers on {scan.samples} sequences "
        f"{took}; {base}{worst}"
    )
