"""Sensitivity of a transformer by the units that mean something in it: attention heads (with
grouped-query attention, a key/value head together with its group of query heads), MLP
intermediate neurons, and whole layers.

Every cell is measured, not estimated: the unit is switched off with a mask on the input of
the projection that reads it (``out_proj`` for heads, ``mlp_down`` for neurons; see
:mod:`studio.core.models.hf_arch`), which is exactly what removing it does, and the model is
evaluated on the data. Nothing is copied and the weights are never touched.

- heads: one row per layer, one column per head group: the drop with that group alone off;
- MLP: one row per layer, one column per ratio: the drop with that fraction of the layer's
  neurons off, least important first (importance: mean |activation| on the data times the
  norm of the neuron's column in the down projection, as Wanda scores weights);
- layers: the drop with the whole layer skipped (its residual branch off).

The metric is the loss: next-token cross-entropy for a causal LM (shown as perplexity), and
1 - cosine similarity to the unpruned model's output for encoders. Drops are in the metric's
units: positive is worse.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import hf_arch
from studio.core.models.data import DataSet
from studio.core.models.evaluate import is_causal_lm
from studio.core.models.loaded import LoadedModel
from studio.core.paths import cache_dir

MLP_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
SCAN_SEQUENCES = 32  # sequences of the data a scan measures on
CACHE_VERSION = 1


@dataclass
class HeadScan:
    """A finished (or partly finished) transformer scan."""

    layers: list[str]  # block names, model order
    groups: list[int]  # head groups per layer
    heads_per_group: list[int]
    metric: str  # "perplexity" (causal LM) or "cosine" (encoders)
    baseline: float  # loss of the unpruned model (cross-entropy, or 1 - cosine = 0)
    head_drop: np.ndarray  # layers x max groups (NaN: not measured, or no such group)
    mlp_ratios: tuple[float, ...]
    mlp_drop: np.ndarray  # layers x ratios
    layer_drop: np.ndarray  # layers
    samples: int = 0
    seconds: float = 0.0
    cached: bool = False
    neuron_order: list[list[int]] = field(default_factory=list)  # least important first

    def shown(self, loss_drop: np.ndarray) -> np.ndarray:
        """Drops as the user reads them: perplexity increase for LMs, cosine lost otherwise."""
        if self.metric != "perplexity":
            return loss_drop
        return np.exp(self.baseline + loss_drop) - math.exp(self.baseline)

    @property
    def baseline_shown(self) -> float:
        return math.exp(self.baseline) if self.metric == "perplexity" else 1.0 - self.baseline

    def group_order(self, layer: int) -> list[int]:
        """The layer's head groups, least sensitive first."""
        row = self.head_drop[layer, : self.groups[layer]]
        return [int(i) for i in np.argsort(np.nan_to_num(row, nan=np.inf), kind="stable")]

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("head_drop", "mlp_drop", "layer_drop"):
            data[key] = np.asarray(getattr(self, key)).tolist()
        return {"studio_head_scan": CACHE_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> HeadScan:
        if data.get("studio_head_scan") != CACHE_VERSION:
            raise StudioError("not a transformer scan written by this studio")
        fields = {k: v for k, v in data.items() if k != "studio_head_scan"}
        for key in ("head_drop", "mlp_drop", "layer_drop"):
            fields[key] = np.asarray(fields[key], dtype=float)
        fields["mlp_ratios"] = tuple(fields["mlp_ratios"])
        return cls(**fields)

    def to_csv(self) -> str:
        unit = "perplexity increase" if self.metric == "perplexity" else "cosine lost"
        lines = [f"layer,unit,index,{unit}"]
        heads = self.shown(self.head_drop)
        mlp = self.shown(self.mlp_drop)
        layer = self.shown(self.layer_drop)
        for i, name in enumerate(self.layers):
            for g in range(self.groups[i]):
                lines.append(f"{name},head group,{g},{heads[i, g]!r}")
            for j, r in enumerate(self.mlp_ratios):
                lines.append(f"{name},mlp ratio,{r},{mlp[i, j]!r}")
            lines.append(f"{name},whole layer,,{layer[i]!r}")
        return "\n".join(lines) + "\n"


# ---- masks ------------------------------------------------------------------------------


@contextmanager
def masked_inputs(module: nn.Module, masks: dict[str, torch.Tensor]):
    """Multiply the last dimension of the input of each named submodule by its mask."""
    named = dict(module.named_modules())
    handles = []
    for name, mask in masks.items():

        def hook(_m, args, mask=mask):
            return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])

        handles.append(named[name].register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def group_mask(block: hf_arch.Block, off: list[int]) -> torch.Tensor:
    """A mask over the out projection's inputs with the query heads of groups ``off`` zeroed."""
    per = block.heads // block.kv_heads
    mask = torch.ones(block.heads * block.head_dim)
    for g in off:
        mask[g * per * block.head_dim : (g + 1) * per * block.head_dim] = 0
    return mask


def neuron_mask(block: hf_arch.Block, off: list[int]) -> torch.Tensor:
    mask = torch.ones(block.intermediate)
    if off:
        mask[torch.as_tensor(off, dtype=torch.long)] = 0
    return mask


@contextmanager
def skipped_layer(module: nn.Module, layer: str):
    """The layer named ``layer`` passes its input hidden states through unchanged, as it does
    once it is removed (depth pruning)."""

    def hook(_m, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    handle = dict(module.named_modules())[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def input_columns(layer: nn.Module) -> torch.Tensor:
    """The weight as (inputs, outputs): transposed for nn.Linear, as is for GPT-2's Conv1D."""
    weight = layer.weight.detach().float()
    return weight if type(layer).__name__ == "Conv1D" else weight.t()


# ---- measuring --------------------------------------------------------------------------


class _Meter:
    """Loss of the model on a fixed set of batches (with the unpruned outputs kept)."""

    def __init__(self, module: nn.Module, data: DataSet, batch: int) -> None:
        self.module = module
        self.lm = is_causal_lm(module)
        self.batches = [data.x[i : i + batch] for i in range(0, len(data), batch)]
        self.reference = None if self.lm else [self._out(x) for x in self.batches]

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x).float()

    def loss(self) -> float:
        total, count = 0.0, 0
        for i, x in enumerate(self.batches):
            out = self._out(x)
            if self.lm:
                logits = out[:, :-1]
                target = x[:, 1:]
                total += float(
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                    )
                )
                count += target.numel()
            else:
                ref = self.reference[i]
                cos = F.cosine_similarity(out.reshape(len(x), -1), ref.reshape(len(x), -1), dim=1)
                total += float((1.0 - cos).sum())
                count += len(x)
        return total / max(1, count)


def neuron_importance(
    module: nn.Module, blocks: list[hf_arch.Block], batches: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per layer, one score per MLP neuron: mean |activation| x norm of its down column."""
    named = dict(getattr(module, "hf", module).named_modules())  # blocks name hf's modules
    sums = [torch.zeros(b.intermediate) for b in blocks]
    counts = [0] * len(blocks)
    handles = []
    for i, b in enumerate(blocks):

        def hook(_m, args, i=i):
            a = args[0].detach().float()
            sums[i] += a.abs().reshape(-1, a.shape[-1]).sum(0).cpu()
            counts[i] += a.reshape(-1, a.shape[-1]).shape[0]

        handles.append(named[b.mlp_down].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for x in batches:
                module(x)
    finally:
        for h in handles:
            h.remove()
    scores = []
    for i, b in enumerate(blocks):
        weight = input_columns(named[b.mlp_down])  # (in, out)
        scores.append(sums[i] / max(1, counts[i]) * weight.norm(dim=1).cpu())
    return scores


def head_importance(
    module: nn.Module, blocks: list[hf_arch.Block], batches: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per layer, one score per head group: the mean norm of what the group adds to the
    residual stream (its slice of the out projection applied to its heads' outputs)."""
    named = dict(getattr(module, "hf", module).named_modules())  # blocks name hf's modules
    sums = [torch.zeros(b.kv_heads) for b in blocks]
    counts = [0] * len(blocks)
    handles = []
    for i, b in enumerate(blocks):
        cols = input_columns(named[b.out_proj])  # (in, out)
        width = b.heads // b.kv_heads * b.head_dim

        def hook(_m, args, i=i, cols=cols, width=width, groups=b.kv_heads):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])
            for g in range(groups):
                part = a[:, g * width : (g + 1) * width] @ cols[g * width : (g + 1) * width]
                sums[i][g] += float(part.norm(dim=1).sum())
            counts[i] += a.shape[0]

        handles.append(named[b.out_proj].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for x in batches:
                module(x)
    finally:
        for h in handles:
            h.remove()
    return [s / max(1, c) for s, c in zip(sums, counts)]


def scan_heads(
    model: LoadedModel,
    data: DataSet,
    mlp_ratios: tuple[float, ...] = MLP_RATIOS,
    sequences: int = SCAN_SEQUENCES,
    batch: int = 8,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    on_row: Callable[[HeadScan, int], None] | None = None,
) -> HeadScan:
    """Measure every head group, MLP ratio and layer of ``model`` on ``data`` (its first
    ``sequences`` sequences). ``on_row(scan, layer)`` hears of each finished layer."""
    start = time.monotonic()
    module = model.module.eval()
    hf = getattr(module, "hf", None)
    if hf is None:
        raise StudioError(f"{model.name} is not a transformer from a Hugging Face folder")
    if data.x.dtype not in (torch.int64, torch.int32) and model.is_text:
        raise StudioError(f"{data.name} is not text: give a .txt or .jsonl file")
    data = data.subset(min(len(data), sequences))
    if len(data) == 0:
        raise StudioError(f"data set {data.name} is empty")
    blocks = hf_arch.blocks(hf)
    prefix = _prefix(module, hf)
    key = _cache_key(model, data, mlp_ratios)
    path = cache_dir() / "head_scans" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            scan = HeadScan.from_dict(json.loads(path.read_text()))
            scan.cached = True
            report(progress, 1.0, "from the cache")
            return scan
        except (StudioError, OSError, ValueError, TypeError, KeyError):
            pass
    report(progress, 0.0, "measuring the unpruned model")
    meter = _Meter(module, data, batch)
    base = meter.loss()
    lm = meter.lm
    n_layers = len(blocks)
    max_groups = max(b.kv_heads for b in blocks)
    scan = HeadScan(
        layers=[b.name for b in blocks],
        groups=[b.kv_heads for b in blocks],
        heads_per_group=[b.heads // b.kv_heads for b in blocks],
        metric="perplexity" if lm else "cosine",
        baseline=base,
        head_drop=np.full((n_layers, max_groups), np.nan),
        mlp_ratios=tuple(mlp_ratios),
        mlp_drop=np.full((n_layers, len(mlp_ratios)), np.nan),
        layer_drop=np.full(n_layers, np.nan),
        samples=len(data),
    )
    order = neuron_importance(module, blocks, meter.batches)
    scan.neuron_order = [[int(j) for j in torch.argsort(s, stable=True)] for s in order]
    cells = sum(b.kv_heads + len(mlp_ratios) + 1 for b in blocks)
    done = 0
    for i, b in enumerate(blocks):
        for g in range(b.kv_heads):
            check(cancel)
            with masked_inputs(module, {prefix + b.out_proj: group_mask(b, [g])}):
                scan.head_drop[i, g] = meter.loss() - base
            done += 1
            report(progress, done / cells, f"{b.name}: head group {g}")
        for j, ratio in enumerate(mlp_ratios):
            check(cancel)
            off = scan.neuron_order[i][: int(round(ratio * b.intermediate))]
            with masked_inputs(module, {prefix + b.mlp_down: neuron_mask(b, off)}):
                scan.mlp_drop[i, j] = meter.loss() - base
            done += 1
            report(progress, done / cells, f"{b.name}: MLP {ratio:.0%}")
        check(cancel)
        with skipped_layer(module, prefix + b.name):
            scan.layer_drop[i] = meter.loss() - base
        done += 1
        report(progress, done / cells, f"{b.name}: whole layer")
        if on_row is not None:
            on_row(scan, i)
    scan.seconds = time.monotonic() - start
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(scan.to_dict()))
    return scan


def _prefix(module: nn.Module, hf: nn.Module) -> str:
    """The name of ``hf`` inside ``module`` plus a dot (block names are relative to ``hf``)."""
    for name, sub in module.named_modules():
        if sub is hf:
            return f"{name}." if name else ""
    return ""


def is_cached(
    model: LoadedModel,
    data: DataSet,
    sequences: int = SCAN_SEQUENCES,
    mlp_ratios: tuple[float, ...] = MLP_RATIOS,
) -> bool:
    """Whether :func:`scan_heads` of ``model`` on ``data`` (same ``sequences`` and
    ``mlp_ratios``) would load from its cache instead of measuring."""
    subset = data.subset(min(len(data), sequences))
    return (cache_dir() / "head_scans" / f"{_cache_key(model, subset, mlp_ratios)}.json").is_file()


def _cache_key(model: LoadedModel, data: DataSet, ratios: tuple[float, ...]) -> str:
    h = hashlib.sha256(
        f"{CACHE_VERSION}|{model.fingerprint()}|{data.fingerprint()}|{ratios}".encode()
    )
    return h.hexdigest()[:20]


def load_head_scan(path: str | Path) -> HeadScan:
    try:
        return HeadScan.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise StudioError(f"cannot read the transformer scan {Path(path).name}: {exc}") from None
