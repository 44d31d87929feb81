"""The pruning engine: apply a :class:`PruningPlan` to a copy of a loaded model.

The loaded model is never changed: the engine works on a deep copy and returns it, with a
before/after summary (parameters, MACs counted as ``studio info`` counts them, size of the saved
state, sparsity, compression, quality, per-layer shapes) and the groups it had to roll back.
Methods: ``structured`` (:mod:`studio.core.prune.structured`), ``unstructured`` and ``nm``
(:mod:`studio.core.prune.weights`), ``blocks`` (:mod:`studio.core.models.blocks`).
"""

from __future__ import annotations

import copy
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import CancelToken, ProgressFn, check, report, sub_progress
from studio.core.models import blocks as prune_blocks
from studio.core.models import graph
from studio.core.models.data import DataSet
from studio.core.models.evaluate import EvalResult, evaluate
from studio.core.models.inventory import layer_rows, trace_layers
from studio.core.models.loaded import EAGER, HUGGINGFACE, ONNX, LoadedModel
from studio.core.models.pruned_file import save_model
from studio.core.plan.costs import BLOCK_REMOVED
from studio.core.plan.plan import NEEDS_DATA, PruningPlan
from studio.core.prune import hf_prune
from studio.core.prune import structured as prune_structured
from studio.core.prune import weights as prune_weights
from studio.core.prune.bn_calibration import (
    batch_norms,
    folded_samples,
    match_statistics,
    recalibrate_bn,
)

Shape = tuple[int, ...] | None


@dataclass(frozen=True)
class PruneResult:
    """A pruned copy of a model and what pruning did to it."""

    module: nn.Module
    model: LoadedModel  # the pruned module as a model: same kind and input shape
    plan: PruningPlan
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int  # bytes of the saved state_dict
    size_after: int
    sparsity: float  # fraction of zeros in the layers' weights after pruning
    compression: float  # parameters before / non-zero parameters after
    quality_before: EvalResult | None
    quality_after: EvalResult | None
    shapes: list[tuple[str, Shape, Shape]]  # (layer, weight shape before, after; None = gone)
    skipped: list[tuple[str, str]]  # (target, one-line reason) for rolled-back/unprunable ones
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values (no module)."""

        def quality(q: EvalResult | None) -> dict | None:
            return None if q is None else q.to_dict()

        return {
            "model": self.model.name,
            "method": self.plan.method,
            "criterion": self.plan.criterion,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "sparsity": self.sparsity,
            "compression": self.compression,
            "quality_before": quality(self.quality_before),
            "quality_after": quality(self.quality_after),
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
            "shapes": [
                {"layer": n, "before": b and list(b), "after": a and list(a)}
                for n, b, a in self.shapes
            ],
            "notes": list(self.notes),
            "seconds": self.seconds,
        }


def prune_targets(model: LoadedModel, method: str) -> list[str]:
    """Names a plan of ``method`` may key its ratios by, in model order: dependency-group roots
    (structured), weight-owning layers (unstructured, nm) or residual blocks (blocks)."""
    _check_kind(model, method)
    module = model.module
    if model.kind == HUGGINGFACE:
        return hf_prune.hf_targets(module, method)
    if method in ("unstructured", "nm"):
        return prune_weights.weight_targets(module, method)
    copied = copy.deepcopy(module).eval()  # traced with hooks; blocks are swapped in and out
    if method == "structured":
        return [info.root for info, _ in prune_structured.trace(copied, model.example_input())[1]]
    if method == "blocks":
        return [b.name for b in prune_blocks.find_blocks(copied, model.example_input())]
    raise StudioError(f"unknown pruning method {method!r}")


def prune(
    model: LoadedModel,
    plan: PruningPlan,
    data: DataSet | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    calibration: DataSet | None = None,
) -> PruneResult:
    """Apply ``plan`` to a copy of ``model``; measure quality before and after on ``data``.

    With ``plan.recalibrate_bn``, the pruned copy's batch-norm statistics are re-estimated on
    ``calibration`` (default: ``data``) before it is measured. A transformer's head groups and
    neurons are chosen on ``calibration`` too (text data's calibration split), so the quality
    measured on ``data`` is measured on text the choice never saw.
    """
    start = time.monotonic()
    _check_kind(model, plan.method)
    if (
        plan.criterion in NEEDS_DATA
        and data is None
        and plan.method != "blocks"
        and model.kind != HUGGINGFACE  # chosen by weight magnitude without data
    ):
        raise StudioError(f"the {plan.criterion} criterion needs data: give --data")
    report(progress, 0.0, "copying the model")
    # the loaded model is only copied: hooks and traces go on the copy, so jobs that run on
    # the loaded model at the same time (the GUI's) are not disturbed
    module = copy.deepcopy(model.module).eval()
    x = model.example_input()
    params_before, macs_before, size_before = _counts(module, x)
    shapes_before = _weight_shapes(module)
    check(cancel)
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    step = sub_progress(progress, 0.05, 0.6 if data is not None else 0.9)
    kept: dict[str, list[int]] = {}  # output channels each layer kept (structured)
    original: nn.Module | None = None  # a copy of the unpruned module, made when needed
    if model.kind == HUGGINGFACE:
        plan.check_model(model.fingerprint(), set(hf_prune.hf_targets(module, plan.method)))
        choose_on = calibration if calibration is not None else data
        skipped, notes = hf_prune.apply_hf_plan(module, plan, choose_on, step, cancel)
    elif plan.method == "structured":
        traced = prune_structured.trace(module, x)
        plan.check_model(model.fingerprint(), {info.root for info, _ in traced[1]})
        skipped, notes = prune_structured.prune_structured(
            module, x, traced, plan, data, step, cancel, kept
        )
    elif plan.method == "blocks":
        plan.check_model(model.fingerprint(), set(prune_targets(model, "blocks")))
        skipped = _remove_blocks(module, x, plan, step, cancel)
    else:
        plan.check_model(
            model.fingerprint(), set(prune_weights.weight_targets(module, plan.method))
        )
        notes = prune_weights.prune_weights(module, plan, data, step, cancel)
    module.eval()
    check(cancel)
    calibration = calibration if calibration is not None else data
    if plan.recalibrate_bn and calibration is not None and batch_norms(module):
        used = recalibrate_bn(module, calibration, None, cancel)
        notes.append(
            f"batch-norm statistics re-estimated on {used:,} samples of {calibration.name}"
        )
    elif plan.recalibrate_bn and batch_norms(module):
        notes.append("batch-norm statistics kept from the unpruned model (no data given)")
    elif plan.recalibrate_bn and calibration is not None and plan.method == "structured" and kept:
        # no batch norms: an exported model has them folded into its convolutions
        outputs = graph.output_layers(module, x)
        skip = {n for n, m in module.named_modules() if m in outputs}
        original = copy.deepcopy(model.module).eval()
        matched = match_statistics(original, module, kept, calibration, skip, cancel)
        if matched:
            notes.append(
                f"{matched} convolutions rescaled to the unpruned model's channel statistics "
                f"on {folded_samples(calibration):,} samples of {calibration.name} "
                "(the model has no batch norms to re-estimate"
                + (": folded on export)" if model.kind == ONNX else ")")
            )
    report(progress, 0.6 if data is not None else 0.9, "measuring")
    params_after, macs_after, size_after = _counts(module, x)
    nonzero = sum(int(torch.count_nonzero(p)) for p in module.parameters())
    before_q = after_q = None
    if data is not None:
        if original is None:  # a copy: evaluate() may move it to a GPU
            original = copy.deepcopy(model.module).eval()
        reference = None if data.labelled else original
        step = sub_progress(progress, 0.6, 0.8)
        before_q = evaluate(original, data, reference=reference, progress=step, cancel=cancel)
        step = sub_progress(progress, 0.8, 1.0)
        after_q = evaluate(module, data, reference=reference, progress=step, cancel=cancel)
        module.cpu()
    shapes_after = _weight_shapes(module)
    shapes = [(n, s, shapes_after.get(n)) for n, s in shapes_before.items()]
    pruned = LoadedModel(
        module,
        f"{model.name} (pruned)",
        model.spec,
        model.kind,
        tuple(model.input_shape),
        arch=model.arch,
        input_names=model.input_names,
        output_names=model.output_names,
        onnx_opset=model.onnx_opset,
        onnx_dynamic_axes=model.onnx_dynamic_axes,
        vocab_size=model.vocab_size,
        task=model.task,
        tokenizer=model.tokenizer,
    )
    report(progress, 1.0, "done")
    return PruneResult(
        module=module,
        model=pruned,
        plan=plan,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        size_before=size_before,
        size_after=size_after,
        sparsity=_sparsity(module),
        compression=params_before / max(1, nonzero),
        quality_before=before_q,
        quality_after=after_q,
        shapes=shapes,
        skipped=skipped,
        seconds=time.monotonic() - start,
        notes=notes,
    )


def save_pruned(result: PruneResult, path: str | Path, protected: tuple[Path, ...] = ()) -> Path:
    """Save the pruned model so ``studio info/eval --model PATH`` load it back without
    running code from the file (.pt: rebuilt from the zoo architecture; .pt2: torch.export;
    .onnx: checked in ONNX Runtime); see :mod:`studio.core.models.pruned_file`."""
    return save_model(result.model, path, protected)


def _check_kind(model: LoadedModel, method: str) -> None:
    if model.kind == HUGGINGFACE and method not in ("structured", "blocks"):
        raise StudioError(
            f"{method} pruning of transformers is not built: use structured (heads and MLP "
            "neurons) or blocks (whole layers)"
        )
    if model.kind not in (EAGER, ONNX, HUGGINGFACE):
        reason = model.unsupported.get("structural pruning", "")
        raise StudioError(
            f"{method} pruning needs an eager or ONNX-imported model, and {model.name} is a "
            f"{model.kind} model: {reason}"
        )


def _remove_blocks(
    module: nn.Module,
    x: torch.Tensor,
    plan: PruningPlan,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
) -> list[tuple[str, str]]:
    """Replace every block whose ratio is at least BLOCK_REMOVED (as the cost model counts
    it) by its shortcut, outermost first; a removal that breaks the model is undone and
    reported."""
    skipped = []
    chosen = [n for n, r in plan.active().items() if r >= BLOCK_REMOVED]
    names = sorted(chosen, key=lambda n: n.count("."))
    with torch.no_grad():
        reference = prune_blocks.output_shape(module(x))
    for i, name in enumerate(names):
        check(cancel)
        report(progress, i / max(1, len(names)), name)
        if name not in dict(module.named_modules()):
            skipped.append((name, "its enclosing block was removed"))
            continue
        try:
            old = prune_blocks.remove_block(module, name)
        except StudioError as exc:
            skipped.append((name, str(exc)))
            continue
        try:
            with torch.no_grad():
                shape = prune_blocks.output_shape(module(x))
            problem = "" if shape == reference else f"the output shape changes to {shape}"
        except Exception as exc:  # the shortcut does not fit where the block was
            problem = f"the model no longer runs ({type(exc).__name__})"
        if problem:
            prune_blocks.set_child(module, name, old)
            skipped.append((name, f"rolled back: {problem}"))
    return skipped


def _counts(module: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """Parameters, MACs (as the inventory counts them) and bytes of the saved state."""
    params = sum(p.numel() for p in module.parameters())
    _, macs = trace_layers(module, x)
    total_macs = sum(macs.get(name, 0) for name, _ in layer_rows(module, macs))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return params, total_macs, len(buffer.getvalue())


def _weight_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of each layer's weight (or first parameter), for layers holding any."""
    shapes = {}
    for name, mod in module.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        tensor = own.get("weight", next(iter(own.values()), None))
        if tensor is not None:
            shapes[name or "(model)"] = tuple(tensor.shape)
    return shapes


def _sparsity(module: nn.Module) -> float:
    """Fraction of exact zeros in the weights (parameters named *weight*, 2-D or more)."""
    weights = [p for n, p in module.named_parameters() if n.rsplit(".", 1)[-1].startswith("weight")]
    weights = [w for w in weights if w.dim() >= 2]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0
