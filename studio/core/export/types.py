"""The formats the studio exports to and what an export reports (see
:mod:`studio.core.export.exporter`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("onnx", "torchscript", "pytorch", "pt2")
SUFFIXES = {
    "onnx": (".onnx",),
    "torchscript": (".pt", ".pth", ".ts"),
    "pytorch": (".pt", ".pth"),
    "pt2": (".pt2",),
}


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
    speed_line: str = ""  # the speed check's line: faster, or not and why
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
            "speed_line": self.speed_line,
            "extra_files": [str(p) for p in self.extra_files],
            "notes": list(self.notes),
            "seconds": self.seconds,
        }
