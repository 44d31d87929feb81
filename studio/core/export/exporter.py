"""Exporting a model to a file to ship, verified before it is written.

Formats:

- ``onnx``: a single-file ONNX model (see :mod:`studio.core.models.onnx_io`), dynamic batch by
  default; a model imported from ONNX keeps what its file declared by default: its input and
  output names, its dynamic dims (checked at a second size of each) and its opset (the nearest
  one torch's exporter writes, if it cannot write that one).
- ``torchscript``: ``torch.jit.trace`` of the module, saved with ``torch.jit.save``.
- ``pt2``: a ``torch.export`` program (as ``studio prune --out X.pt2`` writes it).
- ``pytorch``: for built-in architectures, FILE.pt is the studio's rebuildable file (the
  state_dict, the architecture's name and every layer's sizes; ``torch.load(weights_only=True)``
  reads it, ``studio --model FILE.pt`` rebuilds the model without running code from the file),
  and FILE.module.pt beside it the whole pickled module (``torch.load(weights_only=False)``, which
  needs this studio installed and trusts the file). Other models (ONNX imports) have no
  architecture to rebuild: FILE.pt is then the whole pickled module only. With a ``plan``, the
  recipe is written beside as FILE.recipe.yaml.

Every export is verified before anything is written: the file is written to a temporary name,
``onnx.checker`` checks ONNX files, the file is loaded back in its own runtime (ONNX Runtime,
``torch.jit.load``, the studio's weights-only loaders) and run on sample inputs beside the
in-memory model (at two batch sizes when the batch is dynamic; see
:mod:`studio.core.models.onnx_io` for the tolerance), and the parameters it holds are counted
against the model's. Only a file that passes is renamed into place; input files are never
overwritten. For ONNX, the file's ONNX Runtime latency (batch 1, median) is measured beside the
original (unpruned) model's. Types: :mod:`studio.core.export.types`; the writers:
:mod:`studio.core.export.writers`. Hugging Face text models (token ids in) go to ONNX through
:mod:`studio.core.export.hf_onnx` (dynamic batch and sequence; no latency measured here).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.core.errors import StudioError
from studio.core.export.types import FORMATS, SUFFIXES, ExportResult
from studio.core.export.verify import module_params, zero_fraction
from studio.core.export.writers import Exporter, refuse_protected
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models import onnx_io as export_onnx
from studio.core.models import zoo
from studio.core.models.loaded import EAGER, HUGGINGFACE, LoadedModel

__all__ = ["FORMATS", "SUFFIXES", "ExportResult", "export_model", "unpruned_architecture"]
SAMPLES = 4  # default number of random sample inputs
ZEROS_NOTE = 0.05  # share of zero weights from which the export says they are stored as zeros


def check_export_destination(model: LoadedModel, fmt: str, path: str | Path) -> None:
    """Refuse, before any work, a format or file name that cannot be written."""
    if fmt not in FORMATS:
        raise StudioError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES[fmt]:
        raise StudioError(
            f"a {fmt} export is written as {' or '.join(SUFFIXES[fmt])}, not {suffix or path}"
        )


def export_model(
    model: LoadedModel,
    fmt: str,
    path: str | Path,
    *,
    original: LoadedModel | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_names: tuple[str, ...] | None = None,
    output_names: tuple[str, ...] | None = None,
    samples: torch.Tensor | None = None,
    measure_latency: bool = True,
    latency_budget_s: float = 1.0,
    plan: Any = None,
    protected: tuple[Path, ...] = (),
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ExportResult:
    """Write ``model`` to ``path`` as ``fmt``, verified (see the module docstring).

    ``original`` (ONNX only) is the unpruned model whose ONNX Runtime latency is measured
    beside the exported file's; ``samples`` are the verification inputs (default: random).
    ``plan`` (a PruningPlan) is saved beside a ``pytorch`` export as its recipe.
    """
    start = time.monotonic()
    path = Path(path)
    check_export_destination(model, fmt, path)
    if opset is not None and fmt != "onnx":
        raise StudioError("an opset applies to ONNX exports only")
    opset_note = None
    if fmt == "onnx" and opset is None:  # an ONNX import's own, else the default
        opset, opset_note = export_onnx.supported_opset(model.onnx_opset)
    if opset is not None:
        export_onnx.check_opset(opset)
    protected = (*protected, *_sources(model), *(_sources(original) if original else ()))
    refuse_protected(path, protected)
    if fmt == "onnx" and model.kind == HUGGINGFACE and model.is_text:  # token ids in
        from studio.core.export.hf_onnx import export_result

        return export_result(model, path, opset, protected, progress, cancel)
    module = model.module.eval()
    x = _samples(model, samples, dynamic_batch)
    exporter = Exporter(model, fmt, path, x, dynamic_batch, protected)
    exporter.names = export_onnx.file_names(model, input_names, output_names)
    exporter.axes = export_onnx.file_axes(model, *exporter.names)
    try:
        report(progress, 0.0, f"exporting to {fmt}")
        check(cancel)
        if fmt == "onnx":
            assert opset is not None
            exporter.onnx(opset)
        elif fmt == "torchscript":
            exporter.torchscript()
        elif fmt == "pt2":
            exporter.pt2()
        else:
            exporter.pytorch()
        report(progress, 0.5, "verified")
        check(cancel)
        result = exporter.result
        result.opset = opset
        if opset_note:
            result.notes.append(opset_note)
        if fmt == "onnx":
            result.input_names, result.output_names = exporter.names
        if fmt == "onnx" and measure_latency:
            report(progress, 0.6, "measuring ONNX Runtime latency")
            _measure(result, exporter, model, original, x, latency_budget_s)
        check(cancel)
        share = zero_fraction(module)
        if share >= ZEROS_NOTE:
            result.notes.append(
                f"{share:.0%} of the weights are zeros (unstructured sparsity): they are stored as "
                "zeros, so the file is not smaller and dense runtimes do not run it faster; "
                "structured pruning removes channels for real"
            )
        exporter.commit()
    except BaseException:  # nothing is left behind by a failed or cancelled export
        exporter.cleanup()
        raise
    if plan is not None and fmt == "pytorch":
        recipe = path.with_name(path.stem + ".recipe.yaml")
        plan.save(recipe, protected)
        result.extra_files += (recipe,)
    result.seconds = time.monotonic() - start
    report(progress, 1.0, "done")
    return result


def unpruned_architecture(model: LoadedModel) -> LoadedModel | None:
    """The built-in architecture ``model`` was pruned from, unpruned, with random weights (the
    latency of dense layers does not depend on their values); ``model`` itself when it is not
    pruned; None when it is not a built-in architecture."""
    if model.kind != EAGER or model.arch not in zoo.NAMES:
        return None
    try:
        with torch.no_grad():
            out = model.module(model.example_input())
        classes = int(out.shape[-1])
        fresh = zoo.build(model.arch, input_shape=model.input_shape, num_classes=classes).eval()
    except Exception:  # not shaped like the zoo's architecture after all
        return None
    if module_params(fresh) == module_params(model.module):
        return model
    return LoadedModel(
        fresh,
        f"{model.arch} (unpruned architecture)",
        f"zoo:{model.arch}",
        EAGER,
        model.input_shape,
        arch=model.arch,
    )


def _measure(
    result: ExportResult,
    exporter: Exporter,
    model: LoadedModel,
    original: LoadedModel | None,
    x: np.ndarray,
    budget: float,
) -> None:
    """ONNX Runtime latency at batch 1 of the exported file and of the original model."""
    x1 = x[:1] if result.dynamic_batch else exporter.batches(False)[0]
    if original is None:
        (result.ort_ms_exported,) = export_onnx.latencies_ms([exporter.session], x1, budget)
        result.notes.append("no original model given: the speed-up was not measured")
        return
    names = export_onnx.file_names(original)
    example = torch.from_numpy(x1)
    data = export_onnx.onnx_bytes(
        original.module.eval(),
        example,
        result.opset or export_onnx.DEFAULT_OPSET,
        *names,
        dynamic_batch=result.dynamic_batch,
    )
    reference = export_onnx.session(data)
    ms = export_onnx.latencies_ms([reference, exporter.session], x1, budget)
    result.ort_ms_original, result.ort_ms_exported = ms
    result.original_name = original.name
    result.speed_line = speed_line(original, model, ms[0], ms[1])


def speed_line(original: LoadedModel, model: LoadedModel, before: float, after: float) -> str:
    """The speed check's one line for the export's own measurement (batch 1, median)."""
    from studio.core.latency.alignment import channel_multiple
    from studio.core.latency.measure import default_threads
    from studio.core.latency.speed_check import SpeedCheck, slow_reasons

    multiple = channel_multiple("onnxruntime").multiple
    check = SpeedCheck("onnxruntime", 1, default_threads(), before, after, multiple)
    check.figure = "median"
    if not check.faster:
        check.off_path = slow_reasons(original.module, model.module, multiple)
    return check.line()


def _samples(model: LoadedModel, samples: torch.Tensor | None, dynamic: bool) -> np.ndarray:
    fixed = model.input_shape[0]
    count = max(SAMPLES, fixed) if dynamic else fixed * 2
    x = samples if samples is not None else model.example_input(count)
    if len(x) < 2 or len(x) < fixed:
        raise StudioError(f"give at least {max(2, fixed)} sample inputs to verify the export")
    return x.detach().cpu().float().contiguous().numpy()


def _sources(model: LoadedModel) -> tuple[Path, ...]:
    """The files ``model`` was read from: its path, and its spec's (a pruned copy keeps it)."""
    paths = [model.path] if model.path else []
    if model.spec not in ("demo",) and not model.spec.startswith("zoo:"):
        paths.append(Path(model.spec))
    return tuple(p for p in paths if p.is_file())
