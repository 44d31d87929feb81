"""Hugging Face text models as ONNX files: ``input_ids`` in, ``logits`` (or ``embedding``) out,
dynamic batch and sequence, verified in ONNX Runtime before anything is written.

What is written: the module's own ``forward(input_ids)`` (the studio's wrapper of a transformers
model, :mod:`studio.core.models.hf`, which keeps the model as ``.hf``), or for a bare
transformers model a small wrapper that returns only the output tensor (``use_cache=False``, an
all-ones attention mask): a causal LM's logits ``[batch, sequence, vocab]``, an encoder's
mean-pooled last hidden state ``[batch, hidden]`` (every token counted: the file has no mask
input), a classifier's logits ``[batch, labels]``. The file has no KV cache; decoding latency
with the cache is measured in torch (:mod:`studio.core.latency.decode`).

The exporter is torch's TorchScript-based one (``dynamo=False``), the one
:mod:`studio.core.models.onnx_io` uses: the dynamo exporter needs ``onnxscript``, which the
studio does not ship (on torch 2.13 it fails at once with ``No module named 'onnxscript'``).
Two things in transformers 5 stop the TorchScript exporter, and are worked around only while
exporting (under one lock, as the exporter's state and the second work-around are process-wide):

- attention runs as ``eager`` (matmul, softmax): with ``sdpa`` and no mask to apply, a
  grouped-query-attention model (Llama, Qwen2) calls ``scaled_dot_product_attention`` with
  ``enable_gqa=True``, which the exporter cannot convert; eager attention repeats the key/value
  heads itself. Per-layer head counts (pruned models) are read from tensor shapes either way.
  The model's own setting is restored afterwards;
- no search for packed sequences: without a cache or a mask, transformers' causal mask looks for
  several sequences packed into one row (``masking_utils.find_packed_sequence_indices``, with
  ``torch.diff``, which the exporter does not convert, then a cumulative sum over booleans, which
  ONNX Runtime rejects). The file's positions are always ``0 .. sequence - 1``, one sequence per
  row, so the search is replaced by its answer for that case ("not packed") while exporting.

The file is checked in ONNX Runtime beside the module at two shapes (:data:`CHECK_SHAPES`,
shortened to the model's position limit) other than the traced one, so the dynamic dims are
proved: the largest difference must be at most ``1e-4 * max(1, largest output)`` (the
tolerance of :mod:`studio.core.models.onnx_io`). A file that fails is never written; one that
passes is written atomically (a temporary file renamed into place). Files are a single protobuf:
models over 2 GB (float32 weights of about 500M parameters) cannot be written this way.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.export.types import ExportResult
from studio.core.export.verify import module_params
from studio.core.export.writers import refuse_protected
from studio.core.files import write_atomic
from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.latency.decode import max_positions, transformers_model, vocab_size
from studio.core.models import onnx_io
from studio.core.models.loaded import LoadedModel

__all__ = [
    "CHECK_SHAPES",
    "DEFAULT_OPSET",
    "KINDS",
    "TextOnnx",
    "export_result",
    "export_text_onnx",
    "write_text_onnx",
]

DEFAULT_OPSET = 18
KINDS = {"causal-lm": "logits", "embedding": "embedding", "classifier": "logits"}  # -> output
INPUT = "input_ids"
CHECK_SHAPES = ((1, 16), (2, 37))  # (batch, sequence) the file is verified at
_EXPORT_LOCK = threading.Lock()  # the TorchScript exporter's state is global, and so is the patch
_PACKED = "find_packed_sequence_indices"  # transformers.masking_utils, replaced while exporting


@dataclass(frozen=True)
class TextOnnx:
    """What :func:`write_text_onnx` wrote and how it was verified."""

    path: Path
    kind: str
    opset: int
    input_name: str
    output_name: str
    shapes: tuple[tuple[int, ...], ...]  # input shapes the file was verified at
    max_abs_diff: float  # ONNX Runtime vs torch, over those shapes
    output_scale: float  # largest output magnitude there
    params: int  # floating-point weights the file holds
    params_model: int  # counted the same way in the module
    bytes: int
    seconds: float

    def line(self) -> str:
        shapes = " and ".join(f"({b}, {t})" for b, t in self.shapes)
        return (
            f"verified in ONNX Runtime at input shapes {shapes}: largest difference "
            f"{self.max_abs_diff:.2g} (output scale {self.output_scale:.3g})"
        )


def export_text_onnx(
    module: nn.Module,
    path: str | Path,
    example_ids: torch.Tensor,
    kind: str,
    opset: int = DEFAULT_OPSET,
    protected: tuple[Path, ...] = (),
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Write ``module`` (the studio's wrapper, or a bare transformers model) to ``path`` as a
    verified ONNX file (see the module docstring); ``example_ids`` ``[batch, sequence]`` is the
    traced input, ``kind`` one of :data:`KINDS`. Returns the path; :func:`write_text_onnx`
    returns the verification figures too."""
    return write_text_onnx(
        module, path, example_ids, kind, opset, protected, progress=progress, cancel=cancel
    ).path


def write_text_onnx(
    module: nn.Module,
    path: str | Path,
    example_ids: torch.Tensor,
    kind: str,
    opset: int = DEFAULT_OPSET,
    protected: tuple[Path, ...] = (),
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> TextOnnx:
    """:func:`export_text_onnx`, returning what was written and how it was verified."""
    start = time.monotonic()
    path = Path(path)
    if kind == "vision":
        raise StudioError("a vision model takes pixels, not token ids: export it with export_model")
    if kind not in KINDS:
        raise StudioError(f"unknown text model kind {kind!r}: choose one of {', '.join(KINDS)}")
    if path.suffix.lower() != ".onnx":
        raise StudioError(f"an ONNX export is written as .onnx, not {path.suffix or path}")
    onnx_io.check_opset(opset)
    refuse_protected(path, protected)
    ids = _check_ids(example_ids)
    hf = transformers_model(module)
    graph_module = _OutputOnly(module, kind) if module is hf else module
    graph_module.eval()
    output = KINDS[kind]
    shapes = check_shapes(hf, ids)
    report(progress, 0.0, "exporting to ONNX")
    check(cancel)
    data = _onnx_bytes(graph_module, hf, ids, kind, opset)
    report(progress, 0.6, "verifying in ONNX Runtime")
    check(cancel)
    sess = onnx_io.session(data)
    vocab = vocab_size(hf) or int(ids.max()) + 1
    generator = np.random.default_rng(0)
    batches = [generator.integers(0, vocab, size=s, dtype=np.int64) for s in shapes]
    what = "ONNX file"
    diff, scale = onnx_io.max_abs_diff(
        partial(onnx_io.torch_outputs, graph_module), partial(onnx_io.run, sess), batches, what
    )
    onnx_io.require_match(diff, scale, what)
    check(cancel)
    proto = onnx.load_from_string(data)
    write_atomic(path, data, protected)
    os.chmod(path, 0o644)  # a file to ship: readable by others, as the other exports are
    result = TextOnnx(
        path=path,
        kind=kind,
        opset=opset,
        input_name=INPUT,
        output_name=output,
        shapes=tuple(tuple(b.shape) for b in batches),
        max_abs_diff=diff,
        output_scale=scale,
        params=onnx_io.file_params(proto),
        params_model=module_params(graph_module),
        bytes=path.stat().st_size,
        seconds=time.monotonic() - start,
    )
    report(progress, 1.0, result.line())
    return result


def export_result(
    model: LoadedModel,
    path: Path,
    opset: int | None,
    protected: tuple[Path, ...],
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ExportResult:
    """A Hugging Face text model's ONNX export as :func:`studio.core.export.export_model`
    reports it (that function hands such models here)."""
    example = model.example_input(2)
    task = model.task or ""
    done = write_text_onnx(
        model.module, path, example, task, opset or DEFAULT_OPSET, protected, progress, cancel
    )
    return ExportResult(
        path=done.path,
        format="onnx",
        params=done.params,
        params_model=done.params_model,
        max_abs_diff=done.max_abs_diff,
        output_scale=done.output_scale,
        bytes=done.bytes,
        batch_sizes=tuple(dict.fromkeys(b for b, _ in done.shapes)),
        dynamic_batch=True,
        opset=done.opset,
        input_names=(done.input_name,),
        output_names=(done.output_name,),
        notes=[
            done.line() + "; batch and sequence are dynamic",
            "no KV cache in the file; prefill and decode latency: studio.core.latency.decode",
        ],
        seconds=done.seconds,
    )


def check_shapes(hf: nn.Module | None, ids: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """:data:`CHECK_SHAPES`, sequences cut to the position limit; a sequence length other than
    the traced one is among them, so that the dynamic sequence dim is proved."""
    limit = max_positions(hf) or 1 << 30
    shapes = [(b, min(t, limit)) for b, t in CHECK_SHAPES]
    traced = ids.shape[1]
    if all(t == traced for _, t in shapes):
        shapes[-1] = (shapes[-1][0], traced - 1 if traced == limit else traced + 1)
    if limit < 2 or shapes[-1][1] < 1:
        raise StudioError(f"the model takes at most {limit} tokens: too few to verify an export")
    return tuple(dict.fromkeys(shapes))


class _OutputOnly(nn.Module):
    """A bare transformers model as ``forward(input_ids) -> tensor`` (see the module
    docstring)."""

    def __init__(self, hf: nn.Module, kind: str) -> None:
        super().__init__()
        self.hf, self.kind = hf, kind

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        if self.kind == "embedding":
            return self.hf(input_ids=input_ids, attention_mask=mask).last_hidden_state.mean(1)
        if self.kind == "classifier":
            return self.hf(input_ids=input_ids, attention_mask=mask).logits
        return self.hf(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def _check_ids(example_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(example_ids, torch.Tensor) or example_ids.dim() != 2:
        raise StudioError("the example input must be token ids of shape [batch, sequence]")
    if example_ids.dtype != torch.int64:
        raise StudioError(f"token ids must be int64, not {str(example_ids.dtype).split('.')[-1]}")
    if example_ids.numel() == 0:
        raise StudioError("the example token ids are empty")
    return example_ids.detach().cpu()


def _onnx_bytes(
    module: nn.Module, hf: nn.Module | None, ids: torch.Tensor, kind: str, opset: int
) -> bytes:
    output = KINDS[kind]
    axes = {INPUT: {0: "batch", 1: "sequence"}}
    axes[output] = {0: "batch", 1: "sequence"} if kind == "causal-lm" else {0: "batch"}
    with _EXPORT_LOCK, _exportable(hf):
        return onnx_io.onnx_bytes(module, ids, opset, (INPUT,), (output,), dynamic_axes=axes)


@contextmanager
def _exportable(hf: nn.Module | None) -> Iterator[None]:
    """While exporting: eager attention, and no search for packed sequences (see the module
    docstring); both undone afterwards."""
    from transformers import masking_utils

    before = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    switch = hf is not None and before not in (None, "eager")
    find = getattr(masking_utils, _PACKED, None)
    try:
        if switch:
            _set_attention(hf, "eager")
        if find is not None:
            setattr(masking_utils, _PACKED, _no_packed_sequences)
        yield
    finally:
        if find is not None:
            setattr(masking_utils, _PACKED, find)
        if switch:
            _set_attention(hf, before)


def _no_packed_sequences(position_ids: torch.Tensor) -> None:
    """The file's positions are always 0 .. sequence - 1: one sequence per row, never packed."""
    return None


def _set_attention(hf: Any, implementation: str) -> None:
    try:
        hf.set_attn_implementation(implementation)
    except Exception:  # an architecture that cannot switch: exported as it is
        pass
