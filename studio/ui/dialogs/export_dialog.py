"""File ▸ Export…: write the current model to a verified file, optionally INT8 on top.

The dialog runs :func:`studio.core.export.exporter.export_model` (and
:func:`studio.core.export.quantize.quantize_onnx`) as one background job and shows what the export
proved: parameters in the file against the model, the largest output difference, the size,
ONNX Runtime latency of the original (the loaded, unpruned model) and the export, and the INT8
figures beside the float ones. Errors are one line in the dialog.

The chosen model's own format comes first and is chosen (ONNX for a model opened from ONNX,
TorchScript and .pt2 for those; ONNX, the format to ship, for eager models), and a model opened
from ONNX is offered its own opset and dynamic dims. A transformer from a Hugging Face folder is
offered a Hugging Face folder first (written, loaded back and compared:
:mod:`studio.core.export.hf_folder`), then ONNX with ``input_ids`` in.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from studio.core.export import hf_folder as export_hf
from studio.core.export.hf_folder import HF_FOLDER
from studio.core.export.types import FORMATS, SUFFIXES
from studio.core.models.loaded import EXPORTED, ONNX, TORCHSCRIPT, LoadedModel
from studio.ui.runner import Job, JobRunner
from studio.ui.session import ERROR, Session

FORMAT_LABELS = {
    "onnx": "ONNX",
    "torchscript": "TorchScript",
    "pytorch": "PyTorch",
    "pt2": "torch.export (.pt2)",
    HF_FOLDER: "Hugging Face folder",
}
SUFFIX_OF = {**SUFFIXES, HF_FOLDER: ("",)}  # a folder: a name without a suffix
HF_FORMATS = (HF_FOLDER, "onnx")
OWN_FORMAT = {ONNX: "onnx", TORCHSCRIPT: "torchscript", EXPORTED: "pt2"}
INT8_LABELS = (("None", None), ("INT8 dynamic", "dynamic"), ("INT8 static (calibrated)", "static"))


def model_choices(session: Session) -> list[tuple[str, LoadedModel]]:
    """The models there are to export, best first: fine-tuned, pruned, loaded."""
    out: list[tuple[str, LoadedModel]] = []
    if session.finetuned is not None:
        out.append((f"Fine-tuned: {session.finetuned.model.name}", session.finetuned.model))
    if session.pruned is not None:
        out.append((f"Pruned: {session.pruned.model.name}", session.pruned.model))
    if session.model is not None:
        out.append((f"Loaded (unpruned): {session.model.name}", session.model))
    return out


def format_order(model: LoadedModel | None) -> tuple[str, ...]:
    """The export formats with ``model``'s own first (eager models: ONNX, to ship; a
    transformer from a Hugging Face folder: a folder, then ONNX)."""
    if export_hf.is_hf(model):
        return HF_FORMATS
    own = OWN_FORMAT.get(model.kind, FORMATS[0]) if model is not None else FORMATS[0]
    return (own, *(f for f in FORMATS if f != own))


def dynamic_label(model: LoadedModel | None) -> str:
    """What the dynamic checkbox keeps: an ONNX import's own dynamic dims, else the batch."""
    axes = model.onnx_dynamic_axes if model is not None else None
    if axes is None:
        return "Dynamic batch dimension"
    dims = list(dict.fromkeys(name for dims in axes.values() for name in dims.values()))
    if not dims:
        return "Dynamic dimensions (the original file has none)"
    return f"Dynamic dimensions as in the original file ({', '.join(dims)})"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} ms"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def result_html(result: Any, quantized: Any = None) -> str:
    """The export's (and the INT8 model's) figures as a small HTML table."""
    shown = FORMAT_LABELS[HF_FOLDER] if result.format == HF_FOLDER else result.format
    rows = [
        ("File", html.escape(str(result.path))),
        ("Format", f"{shown}" + (f", opset {result.opset}" if result.opset else "")),
        ("Parameters", f"{result.params:,} in the file, {result.params_model:,} in the model"),
        ("Largest output difference", f"{result.max_abs_diff:.2g} (batch {result.batch_sizes})"),
        ("Size", f"{result.bytes:,} bytes"),
    ]
    if result.ort_ms_exported is not None:
        speed = f": speed-up {result.speedup:.2f}×" if result.speedup else ""
        rows.append(
            (
                "ONNX Runtime (batch 1)",
                f"{_ms(result.ort_ms_original)} original → {_ms(result.ort_ms_exported)}{speed}",
            )
        )
    if getattr(result, "speed_line", ""):
        colour = "#c62828" if result.speed_line.startswith("not faster") else "#2e7d32"
        line = html.escape(result.speed_line, quote=False)
        rows.append(("Speed check", f"<span style='color:{colour}'>{line}</span>"))
    text = "".join(f"<tr><th align='left'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    out = f"<h3>Exported</h3><table cellspacing='6'>{text}</table>"
    if quantized is not None:
        q = quantized
        cells = [
            ("", "Float", "INT8"),
            ("Size", f"{q.bytes_float:,} B", f"{q.bytes_int8:,} B"),
            ("Accuracy", _pct(q.accuracy_float), _pct(q.accuracy_int8)),
            ("Agreement with the original", _pct(q.agreement_float_reference),
             _pct(q.agreement_int8_reference)),
            ("Agreement with float", "100%", _pct(q.agreement_int8)),
            ("ONNX Runtime (batch 1)", _ms(q.ort_ms_float), _ms(q.ort_ms_int8)),
        ]  # fmt: skip
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells
        )
        out += (
            f"<h3>INT8 ({q.mode})</h3><p>{html.escape(str(q.path))}</p>"
            f"<table cellspacing='6'>{body}</table>"
        )
    notes = list(result.notes) + (list(quantized.notes) if quantized is not None else [])
    if notes:
        out += "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
    return out


class ExportDialog(QDialog):
    """Choose model, format and file; export in the background; show the verified figures."""

    exported = Signal(object, object)  # ExportResult, QuantizeResult | None

    def __init__(
        self,
        session: Session,
        runner: JobRunner,
        start_dir: str = "",
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export model")
        self.session, self.runner = session, runner
        self.start_dir = start_dir
        self.job: Job | None = None
        self.last_result: Any = None  # ExportResult
        self.last_quantized: Any = None  # QuantizeResult | None
        self.model_combo = QComboBox()
        self.format_combo = QComboBox()
        self._fill_formats(FORMATS)
        self.opset = QSpinBox()
        self._opset_range()
        self.dynamic = QCheckBox("Dynamic batch dimension")
        self.dynamic.setChecked(True)
        self.path = QLineEdit()
        browse = QPushButton("Browse…")
        browse.clicked.connect(self.browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path, 1)
        path_row.addWidget(browse)
        self.int8 = QComboBox()
        for label, mode in INT8_LABELS:
            self.int8.addItem(label, mode)
        form = QFormLayout()
        form.addRow("Model", self.model_combo)
        form.addRow("Format", self.format_combo)
        form.addRow("ONNX opset", self.opset)
        form.addRow("", self.dynamic)
        form.addRow("File", path_row)
        form.addRow("Quantize", self.int8)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.result_view = QTextBrowser()
        self.result_view.setMinimumHeight(220)
        self.buttons = QDialogButtonBox()
        self.export_button = self.buttons.addButton("Export", QDialogButtonBox.ButtonRole.ApplyRole)
        self.cancel_button = self.buttons.addButton(
            "Cancel export", QDialogButtonBox.ButtonRole.ActionRole
        )
        self.buttons.addButton(QDialogButtonBox.StandardButton.Close)
        self.export_button.clicked.connect(self.start_export)
        self.cancel_button.clicked.connect(self.cancel_export)
        self.buttons.rejected.connect(self.reject)
        box = QVBoxLayout(self)
        box.addLayout(form)
        box.addWidget(self.progress)
        box.addWidget(self.message)
        box.addWidget(self.result_view, 1)
        box.addWidget(self.buttons)
        self.format_combo.currentIndexChanged.connect(self._format_changed)
        self.model_combo.currentIndexChanged.connect(lambda _i: self._model_changed())
        runner.progress.connect(self._on_progress)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        runner.cancelled.connect(self._on_cancelled)
        self.resize(640, 620)
        self.refresh()

    # --- state ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Fill the model choices from the session (call before showing the dialog again)."""
        self.model_combo.clear()
        self._choices = model_choices(self.session)
        for label, _model in self._choices:
            self.model_combo.addItem(label)
        has_data = self.session.data is not None
        self.int8.model().item(2).setEnabled(has_data)  # type: ignore[attr-defined]
        self.int8.setItemData(
            2,
            "" if has_data else "Static INT8 calibrates on data: open data first",
            Qt.ItemDataRole.ToolTipRole,
        )
        self._model_changed()
        self._set_busy(False)

    def chosen_model(self) -> LoadedModel | None:
        i = self.model_combo.currentIndex()
        return self._choices[i][1] if 0 <= i < len(self._choices) else None

    def chosen_format(self) -> str:
        return str(self.format_combo.currentData())

    def _opset_range(self) -> None:
        from studio.core.models.onnx_io import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

        self.opset.setRange(MIN_OPSET, MAX_OPSET)
        self.opset.setValue(DEFAULT_OPSET)

    def _own_opset(self, model: LoadedModel | None) -> int:
        """The opset ``model`` is exported with unless the user picks another (an ONNX
        import's own, or the nearest one torch writes; the default for other models)."""
        from studio.core.models.onnx_io import supported_opset

        if export_hf.is_hf(model) and model is not None and model.is_text:
            from studio.core.export.hf_onnx import DEFAULT_OPSET  # the text exporter's own

            return DEFAULT_OPSET
        return supported_opset(model.onnx_opset if model is not None else None)[0]

    def _fill_formats(self, order: tuple[str, ...]) -> None:
        self.format_combo.blockSignals(True)
        self.format_combo.clear()
        for fmt in order:
            self.format_combo.addItem(FORMAT_LABELS[fmt], fmt)
        self.format_combo.setCurrentIndex(0)
        self.format_combo.blockSignals(False)

    def _model_changed(self) -> None:
        """Offer the chosen model's own format first (chosen when the order changes), its
        own opset and, for an ONNX import, its own dynamic dims."""
        model = self.chosen_model()
        order = format_order(model)
        current = tuple(self.format_combo.itemData(i) for i in range(self.format_combo.count()))
        if order != current:
            self._fill_formats(order)
        self.opset.setValue(self._own_opset(model))
        own = model is not None and model.onnx_opset is not None
        self.opset.setToolTip("the opset of the original ONNX file" if own else "")
        self.dynamic.setText(dynamic_label(model))
        axes = model.onnx_dynamic_axes if model is not None else None
        self.dynamic.setEnabled(axes is None or bool(axes))
        if export_hf.is_hf(model):  # the text exporter always makes both dims dynamic
            self.dynamic.setText("Dynamic batch and sequence (always, for transformers)")
            self.dynamic.setChecked(True)
            self.dynamic.setEnabled(False)
        self._format_changed()

    def _format_changed(self, *_args: object) -> None:
        onnx = self.chosen_format() == "onnx"
        self.opset.setEnabled(onnx)
        hf = export_hf.is_hf(self.chosen_model())
        self.int8.setEnabled(onnx and not hf)
        self.int8.setToolTip("INT8 is not offered for transformers yet" if hf else "")
        if not onnx or hf:
            self.int8.setCurrentIndex(0)
        self._suggest_path()

    def _suggest_path(self) -> None:
        """Keep the file name, give it the format's suffix (or suggest one from the model)."""
        suffix = SUFFIX_OF[self.chosen_format()][0]
        text = self.path.text().strip()
        if text:
            current = Path(text)
            if current.suffix.lower() not in SUFFIX_OF[self.chosen_format()]:
                self.path.setText(str(current.with_suffix(suffix)))
            return
        model = self.chosen_model()
        if model is None:
            return
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in model.name).strip("-")
        folder = Path(self.start_dir or Path.home())
        self.path.setText(str(folder / f"{stem or 'model'}{suffix}"))

    def browse(self) -> None:
        fmt = self.chosen_format()
        pattern = " ".join(f"*{s}" for s in SUFFIX_OF[fmt])
        label = export_hf.FOLDER_FILTER if fmt == HF_FOLDER else f"{FORMAT_LABELS[fmt]} ({pattern})"
        path, _ = QFileDialog.getSaveFileName(self, "Export to", self.path.text(), label)
        if path:
            self.path.setText(path)

    # --- the job -------------------------------------------------------------------------

    def start_export(self) -> Job | None:
        """Check the choices, then export (and quantize) in the background."""
        from studio.core.export.exporter import export_model
        from studio.core.export.quantize import int8_path, quantize_onnx

        model = self.chosen_model()
        text = self.path.text().strip()
        if model is None or not text:
            self._fail("Choose a model and a file to export to.")
            return None
        path = Path(text).expanduser()
        protected = tuple(self.session.input_files())
        if any(path.resolve() == p.resolve() for p in protected):
            self._fail(f"{path.name} is the file the model was opened from: choose another name.")
            return None
        fmt = self.chosen_format()
        if fmt == HF_FOLDER:
            return self._start_folder(model, path, protected)
        mode = self.int8.currentData() if fmt == "onnx" else None
        data = self.session.data
        if mode == "static" and data is None:
            self._fail("Static INT8 calibrates on data: open data first (File ▸ Open data).")
            return None
        original = self.session.model if self.session.model is not model else None
        plan = self.session.pruned.plan if self.session.pruned is not None else None
        samples = data.x[:8] if data is not None and len(data) >= 2 else None
        options = {
            "original": original,
            # the model's own opset is left to export_model, which notes a changed one
            "opset": self.opset.value()
            if fmt == "onnx" and self.opset.value() != self._own_opset(model)
            else None,
            "dynamic_batch": self.dynamic.isChecked(),
            "samples": samples,
            "plan": plan if model is not self.session.model else None,
            "protected": protected,
        }

        def work(progress: Any, cancel: Any) -> tuple[Any, Any]:
            share = 0.5 if mode else 1.0
            result = export_model(
                model,
                fmt,
                path,
                progress=lambda f, m="": progress(f * share, m),
                cancel=cancel,
                **options,
            )
            if not mode:
                return result, None
            quantized = quantize_onnx(
                result.path,
                int8_path(result.path),
                mode,
                data,
                reference=original.module if original is not None else None,
                protected=protected,
                progress=lambda f, m="": progress(0.5 + f / 2, f"INT8: {m}"),
                cancel=cancel,
            )
            return result, quantized

        self.message.setText("")
        self.job = self.runner.start(f"Export to {path.name}", work)
        self._set_busy(True)
        return self.job

    def _start_folder(self, model: LoadedModel, path: Path, protected: tuple) -> Job:
        """A transformer as a Hugging Face folder, loaded back and compared."""

        def work(progress: Any, cancel: Any) -> tuple[Any, None]:
            return export_hf.export_folder(model, path, protected, progress, cancel), None

        self.message.setText("")
        self.job = self.runner.start(f"Export to {path.name}", work)
        self._set_busy(True)
        return self.job

    def cancel_export(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def _set_busy(self, busy: bool) -> None:
        self.progress.setVisible(busy)
        self.progress.setValue(0)
        self.export_button.setEnabled(not busy and bool(self._choices))
        self.cancel_button.setEnabled(busy)

    def _fail(self, message: str) -> None:
        self.message.setText(f"<span style='color:#b00020'>{html.escape(message)}</span>")

    def _on_progress(self, job: Job, fraction: float, message: str, _eta: object) -> None:
        if job is self.job:
            self.progress.setValue(int(fraction * 100))
            self.progress.setFormat(f"%p% {message}")

    def _on_finished(self, job: Job, result: object) -> None:
        if job is not self.job:
            return
        self.job = None
        self._set_busy(False)
        self.last_result, self.last_quantized = result  # type: ignore[misc]
        self.result_view.setHtml(result_html(self.last_result, self.last_quantized))
        r = self.last_result
        speed = f", {r.speedup:.2f}x faster in ONNX Runtime" if r.speedup else ""
        self.message.setText(f"Exported and verified: {r.path}")
        self.session.log(
            f"Exported {r.format} to {r.path}: {r.params:,} parameters, "
            f"max difference {r.max_abs_diff:.2g}, {r.bytes:,} bytes{speed}"
        )
        if self.last_quantized is not None:
            q = self.last_quantized
            self.session.log(f"INT8 ({q.mode}): {q.path}, {q.bytes_int8:,} bytes")
        self.exported.emit(self.last_result, self.last_quantized)

    def _on_failed(self, job: Job, message: str) -> None:
        if job is self.job:
            self.job = None
            self._set_busy(False)
            self._fail(f"Export failed: {message}")
            self.session.log(f"Export failed: {message}", ERROR)

    def _on_cancelled(self, job: Job) -> None:
        if job is self.job:
            self.job = None
            self._set_busy(False)
            self.message.setText("Export cancelled: nothing was written.")
