"""Writing a transformer from a Hugging Face folder, as ``studio prune/finetune --out`` do: a
Hugging Face folder (``save_pretrained`` with its tokenizer; a path without a suffix) or ONNX
with ``input_ids`` in (``.onnx``, verified in ONNX Runtime by the core). The Export dialog
loads a written folder back with :func:`~studio.core.models.load.load_model` and compares it
with the model before it says the folder is written. Plain functions: the dialog and the
Training tab run them as jobs."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from studio.core.errors import StudioError
from studio.core.export.types import ExportResult
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models.load import load_model
from studio.core.models.loaded import HUGGINGFACE, LoadedModel

HF_FOLDER = "huggingface"  # the Export dialog's format name for a Hugging Face folder
TOLERANCE = 1e-4  # of the largest output, as the other exports are checked
FOLDER_FILTER = "Hugging Face folder (a name without a suffix) (*)"
ONNX_FILTER = "ONNX model, input_ids in (*.onnx)"


def is_hf(model: LoadedModel | None) -> bool:
    return model is not None and model.kind == HUGGINGFACE and hasattr(model.module, "hf")


def check_path(path: str | Path) -> Path:
    """A transformer goes to a folder (no suffix) or to .onnx."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in ("", ".onnx"):
        raise StudioError(
            f"a transformer is saved as a Hugging Face folder (a name without a suffix) or as "
            f".onnx, not {path.suffix}"
        )
    return path


def save_transformer(
    model: LoadedModel,
    path: str | Path,
    protected: tuple[Path, ...] = (),
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Write ``model`` to a Hugging Face folder or, for ``.onnx``, a verified ONNX file."""
    path = check_path(path)
    if path.suffix.lower() == ".onnx":
        from studio.core.export.hf_onnx import export_text_onnx

        if not model.is_text:
            raise StudioError(f"{model.name} takes pixels: export it from File ▸ Export…")
        return export_text_onnx(
            model.module,
            path,
            model.example_input(),
            model.task or "",
            protected=protected,
            progress=progress,
            cancel=cancel,
        )
    from studio.core.prune.transformer import save_pretrained

    report(progress, 0.0, f"writing {path.name}")
    written = save_pretrained(model.module.hf, path, model.tokenizer, protected=protected)
    check(cancel)
    return written


def export_folder(
    model: LoadedModel,
    path: str | Path,
    protected: tuple[Path, ...] = (),
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ExportResult:
    """Write the folder, load it back and compare its outputs with ``model``'s on two
    sequences; a folder that does not load back as the model is an error."""
    start = time.monotonic()
    path = check_path(path)
    if path.suffix:
        raise StudioError(f"a Hugging Face folder is a name without a suffix, not {path.name}")
    written = save_transformer(model, path, protected, progress, cancel)
    report(progress, 0.5, "loading the folder back")
    loaded = load_model(str(written), input_shape=tuple(model.input_shape))
    check(cancel)
    x = model.example_input(2)
    with torch.no_grad():
        expected = model.module.eval()(x)
        got = loaded.module.eval()(x)
    if got.shape != expected.shape:
        raise StudioError(
            f"{written.name} loads back with outputs {tuple(got.shape)}, not "
            f"{tuple(expected.shape)}"
        )
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    params = sum(p.numel() for p in loaded.module.parameters())
    params_model = sum(p.numel() for p in model.module.parameters())
    if params != params_model or diff > TOLERANCE * max(1.0, scale):
        raise StudioError(
            f"{written.name} does not load back as the model: {params:,} parameters against "
            f"{params_model:,}, largest output difference {diff:.2g}"
        )
    files = [f for f in written.rglob("*") if f.is_file()]
    report(progress, 1.0, "verified")
    return ExportResult(
        path=written,
        format=HF_FOLDER,
        params=params,
        params_model=params_model,
        max_abs_diff=diff,
        output_scale=scale,
        bytes=sum(f.stat().st_size for f in files),
        batch_sizes=(int(x.shape[0]),),
        dynamic_batch=True,
        notes=[
            f"loads back with load_model as {loaded.name}: {len(files)} files (safetensors "
            "weights, config, tokenizer)",
            "studio info/eval/prune --model FOLDER, or transformers' from_pretrained where the "
            "config can describe the pruned sizes (see studio.core.models.hf_arch)",
        ],
        seconds=time.monotonic() - start,
    )
