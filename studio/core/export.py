"""Exporting a model to a file to ship, verified before it is written.

Formats:

- ``onnx``: a single-file ONNX model (see :mod:`studio.core.export_onnx`), dynamic batch by
  default; a model imported from ONNX keeps its input and output names.
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
:mod:`studio.core.export_verify` for the tolerance), and the parameters it holds are counted
against the model's. Only a file that passes is renamed into place; input files are never
overwritten.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from studio.core import export_onnx, zoo
from studio.core.errors import StudioError
from studio.core.export_verify import (
    BatchShapeError,
    max_abs_diff,
    module_params,
    require_match,
    require_params,
    torch_outputs,
    zero_fraction,
)
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.loaders import first_line
from studio.core.models import EAGER, LoadedModel

FORMATS = ("onnx", "torchscript", "pytorch", "pt2")
SUFFIXES = {
    "onnx": (".onnx",),
    "torchscript": (".pt", ".pth", ".ts"),
    "pytorch": (".pt", ".pth"),
    "pt2": (".pt2",),
}
SAMPLES = 4  # default number of random sample inputs
ZEROS_NOTE = 0.05  # share of zero weights from which the export says they are stored as zeros


@dataclass
class ExportResult:
    """What an export wrote and how it was verified; ready for a report or a dialog."""

    path: Path
    format: str
    params: int  # counted in the file (see export_verify.module_params)
    params_model: int  # counted the same way in the in-memory model
    max_abs_diff: float  # exported file vs in-memory model on the sample inputs
    output_scale: float  # largest output magnitude on those inputs
    bytes: int
    batch_sizes: tuple[int, ...]  # batch sizes the file was verified at
    dynamic_batch: bool
    opset: int | None = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    ort_ms_original: float | None = None  # ONNX Runtime, batch 1, median
    ort_ms_exported: float | None = None
    original_name: str | None = None
    extra_files: tuple[Path, ...] = ()
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def speedup(self) -> float | None:
        if self.ort_ms_original is None or not self.ort_ms_exported:
            return None
        return self.ort_ms_original / self.ort_ms_exported

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "params": self.params,
            "params_model": self.params_model,
            "max_abs_diff": self.max_abs_diff,
            "output_scale": self.output_scale,
            "bytes": self.bytes,
            "batch_sizes": list(self.batch_sizes),
            "dynamic_batch": self.dynamic_batch,
            "opset": self.opset,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "ort_ms_original": self.ort_ms_original,
            "ort_ms_exported": self.ort_ms_exported,
            "speedup": self.speedup,
            "original": self.original_name,
            "extra_files": [str(p) for p in self.extra_files],
            "notes": list(self.notes),
            "seconds": self.seconds,
        }


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
    opset = (opset or export_onnx.DEFAULT_OPSET) if fmt == "onnx" else None
    if opset is not None:
        export_onnx.check_opset(opset)
    protected = (*protected, *_sources(model), *(_sources(original) if original else ()))
    _refuse_protected(path, protected)
    module = model.module.eval()
    x = _samples(model, samples, dynamic_batch)
    exporter = _Exporter(model, fmt, path, x, dynamic_batch, protected)
    exporter.names = _names(model, input_names, output_names)
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
        if fmt == "onnx":
            result.input_names, result.output_names = exporter.names
        if fmt == "onnx" and measure_latency:
            report(progress, 0.6, "measuring ONNX Runtime latency")
            _measure(result, exporter, original, x, latency_budget_s)
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


class _Exporter:
    """One export: writes temporary files, verifies them, renames them into place."""

    def __init__(
        self,
        model: LoadedModel,
        fmt: str,
        path: Path,
        x: np.ndarray,
        dynamic: bool,
        protected: tuple[Path, ...],
    ) -> None:
        self.model, self.fmt, self.path, self.x = model, fmt, path, x
        self.dynamic, self.protected = dynamic, protected
        self.names: tuple[tuple[str, ...], tuple[str, ...]] = (("input",), ("output",))
        self.temps: list[tuple[Path, Path]] = []  # (temporary file, final path)
        self.result: ExportResult
        self.session: Any = None

    def batches(self, dynamic: bool) -> list[np.ndarray]:
        if dynamic:
            return [self.x, self.x[:1]]
        fixed = self.model.input_shape[0]
        return [self.x[i : i + fixed] for i in range(0, len(self.x) - fixed + 1, fixed)][:3]

    def temp(self, final: Path) -> Path:
        _refuse_protected(final, self.protected)
        fd, name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=f".tmp{final.suffix}", dir=final.parent
        )
        os.close(fd)
        self.temps.append((Path(name), final))
        return Path(name)

    def verify(self, run: Callable[[np.ndarray], Any], loaded_params: int, dynamic: bool) -> None:
        model_params = module_params(self.model.module)
        batches = self.batches(dynamic)
        what = f"{self.fmt} file"
        diff, scale = max_abs_diff(self.expected, run, batches, what)
        require_match(diff, scale, what)
        require_params(loaded_params, model_params, what)
        self.result = ExportResult(
            path=self.path,
            format=self.fmt,
            params=loaded_params,
            params_model=model_params,
            max_abs_diff=diff,
            output_scale=scale,
            bytes=0,
            batch_sizes=tuple(len(b) for b in batches),
            dynamic_batch=dynamic,
            extra_files=tuple(final for _, final in self.temps[1:]),
        )

    def expected(self, x: np.ndarray) -> list[np.ndarray]:
        return torch_outputs(self.model.module, x)

    def fixed_fallback(self, attempt: Callable[[bool], None]) -> None:
        """``attempt(dynamic)``; when the file fails at another batch size than the one it was
        traced at, again with the model's own fixed batch size, and say so."""
        if not self.dynamic:
            attempt(False)
            return
        try:
            attempt(True)
        except BatchShapeError:
            attempt(False)
            self.result.notes.append(
                f"the {self.fmt} file has a fixed batch size of {self.model.input_shape[0]}: "
                "the model computes shapes from its input, which tracing records as constants"
            )

    def onnx(self, opset: int) -> None:
        inputs, outputs = self.names
        tmp = self.temp(self.path)

        def attempt(dynamic: bool) -> None:
            example = torch.from_numpy(self.x[:2] if dynamic else self.batches(False)[0])
            data = export_onnx.onnx_bytes(
                self.model.module, example, opset, inputs, outputs, dynamic
            )
            tmp.write_bytes(data)
            proto = onnx.load(str(tmp))
            export_onnx.check(proto)
            self.session = export_onnx.session(str(tmp))
            run = partial(export_onnx.run, self.session)
            self.verify(run, export_onnx.file_params(proto), dynamic)

        self.fixed_fallback(attempt)
        if self.model.input_names:
            self.result.notes.append("the original input and output names are kept")
        odd, convs = export_onnx.unaligned_convs(onnx.load(str(tmp)))
        if odd:
            self.result.notes.append(
                f"{odd} of {convs} convolutions have output channels that are not a multiple "
                "of 8: ONNX Runtime's CPU layout optimisation (NCHWc) skips them, so they run "
                "slower than their MACs suggest"
            )

    def torchscript(self) -> None:
        tmp = self.temp(self.path)

        def attempt(dynamic: bool) -> None:
            self._trace(tmp, dynamic)
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
            self.verify(partial(torch_outputs, loaded), module_params(loaded), dynamic)

        self.fixed_fallback(attempt)

    def _trace(self, tmp: Path, dynamic: bool) -> None:
        example = torch.from_numpy(self.x[:2] if dynamic else self.batches(False)[0])
        try:
            with torch.no_grad():
                traced = torch.jit.trace(self.model.module, (example,), check_trace=False)
            torch.jit.save(traced, str(tmp))
        except Exception as error:  # untraceable Python control flow and more
            raise StudioError(
                f"the model could not be traced to TorchScript: {type(error).__name__}: "
                f"{first_line(error)}"
            ) from None

    def pt2(self) -> None:
        from studio.core.loaders import load_file
        from studio.core.pruned_file import save_model

        tmp = self.temp(self.path)
        save_model(self.model, tmp)
        loaded = load_file(tmp, input_shape=self.model.input_shape)
        fixed = any("fixed batch size" in note for note in loaded.notes)
        self.verify(
            lambda b: torch_outputs(loaded.module, b),
            module_params(loaded.module),
            self.dynamic and not fixed,
        )
        if fixed:
            fixed_at = loaded.input_shape[0]
            self.result.notes.append(f"torch.export fixed the batch size at {fixed_at}")

    def pytorch(self) -> None:
        from studio.core.loaders import load_file
        from studio.core.pruned_file import save_model

        rebuildable = self.model.kind == EAGER and self.model.arch in zoo.NAMES
        tmp = self.temp(self.path)
        if rebuildable:
            save_model(self.model, tmp)
            loaded = load_file(tmp).module
            whole = self.temp(self.path.with_name(self.path.stem + ".module" + self.path.suffix))
        else:
            whole = tmp
        torch.save(self.model.module, str(whole))
        # our own file, just written: unpickling it runs no code but the studio's
        module = torch.load(str(whole), map_location="cpu", weights_only=False).eval()
        if not rebuildable:
            loaded = module
        else:
            diff, scale = max_abs_diff(
                self.expected,
                lambda b: torch_outputs(module, b),
                self.batches(True),
                "whole-module file",
            )
            require_match(diff, scale, "whole-module file")
        self.verify(lambda b: torch_outputs(loaded, b), module_params(loaded), True)
        if not rebuildable:
            self.result.notes.append(
                f"{self.model.name} is not a built-in architecture: the file is the whole pickled "
                "module, which loads only with --trust-pickle (pt2 or onnx load without it)"
            )

    def commit(self) -> None:
        """Rename every verified temporary file into place."""
        try:
            for tmp, final in self.temps:
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a file to ship from others
                os.replace(tmp, final)
        except OSError as error:
            raise StudioError(f"cannot write {self.path}: {error.strerror or error}") from None
        finally:
            self.cleanup()
        self.result.bytes = self.path.stat().st_size

    def cleanup(self) -> None:
        for tmp, _ in self.temps:
            tmp.unlink(missing_ok=True)


def _measure(
    result: ExportResult,
    exporter: _Exporter,
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
    names = _names(original, None, None)
    example = torch.from_numpy(x1)
    data = export_onnx.onnx_bytes(
        original.module.eval(),
        example,
        result.opset or 17,
        *names,
        dynamic_batch=result.dynamic_batch,
    )
    reference = export_onnx.session(data)
    ms = export_onnx.latencies_ms([reference, exporter.session], x1, budget)
    result.ort_ms_original, result.ort_ms_exported = ms
    result.original_name = original.name


def _samples(model: LoadedModel, samples: torch.Tensor | None, dynamic: bool) -> np.ndarray:
    fixed = model.input_shape[0]
    count = max(SAMPLES, fixed) if dynamic else fixed * 2
    x = samples if samples is not None else model.example_input(count)
    if len(x) < 2 or len(x) < fixed:
        raise StudioError(f"give at least {max(2, fixed)} sample inputs to verify the export")
    return x.detach().cpu().float().contiguous().numpy()


def _names(
    model: LoadedModel, inputs: tuple[str, ...] | None, outputs: tuple[str, ...] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names: given ones, else an ONNX import's own, else input/output."""
    inputs = tuple(inputs or model.input_names or ("input",))
    if outputs is None:
        outputs = model.output_names or None
    if outputs is None:
        with torch.no_grad():
            out = model.module(model.example_input())
        count = len(out) if isinstance(out, tuple | list) else 1
        outputs = ("output",) if count == 1 else tuple(f"output{i}" for i in range(count))
    if len(inputs) != 1:
        raise StudioError(f"the model takes one input, but {len(inputs)} input names were given")
    return inputs, tuple(outputs)


def _sources(model: LoadedModel) -> tuple[Path, ...]:
    """The files ``model`` was read from: its path, and its spec's (a pruned copy keeps it)."""
    paths = [model.path] if model.path else []
    if model.spec not in ("demo",) and not model.spec.startswith("zoo:"):
        paths.append(Path(model.spec))
    return tuple(p for p in paths if p.is_file())


def _refuse_protected(target: Path, protected: tuple[Path, ...]) -> None:
    for other in protected:
        if target.resolve() == Path(other).resolve():
            raise StudioError(f"refusing to write over {target.name}: it is an input file")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise StudioError(f"cannot write {target}: folder {folder} does not exist")
