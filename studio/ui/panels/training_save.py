"""The Training tab's files: the charts as PNG, the history as CSV, and the fine-tuned model
(PyTorch, .pt2 or ONNX; a transformer from a Hugging Face folder as a folder or ONNX, written
in a job). A mix-in of :class:`studio.ui.panels.training_panel.TrainingPanel`, which provides
the session, the runner, the charts, the history and ``_fail``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtWidgets import QFileDialog

from studio.core.errors import StudioError
from studio.core.export import hf_folder as export_hf
from studio.core.files import write_atomic
from studio.core.jobs import CancelToken, ProgressFn
from studio.core.models.loaded import ONNX
from studio.core.models.pruned_file import save_model
from studio.core.train.types import history_csv
from studio.ui.runner import Job
from studio.ui.widgets import charts

MODEL_FILTER = "PyTorch model (*.pt);;torch.export program (*.pt2);;ONNX model (*.onnx)"
ONNX_FIRST = "ONNX model (*.onnx);;torch.export program (*.pt2);;PyTorch model (*.pt)"


class TrainingSave:
    """Saving what the Training tab made."""

    session: Any
    runner: Any
    charts: Any
    history: list
    save_job: Job | None

    def save_png(self, path: str | Path) -> Path:
        return charts.save_png(self.charts, path, self.session.input_files())

    def save_csv(self, path: str | Path) -> Path:
        if not self.history:
            raise StudioError("there is no training history to save yet")
        return write_atomic(path, history_csv(self.history), self.session.input_files())

    def save_model(self, path: str | Path) -> Path:
        result = self.session.finetuned
        if result is None:
            raise StudioError("there is no fine-tuned model to save yet")
        if export_hf.is_hf(result.model):
            return export_hf.save_transformer(result.model, path, self.session.input_files())
        return save_model(result.model, path, self.session.input_files())

    def save_transformer(self, path: str | Path) -> Job | None:
        """Write the fine-tuned transformer (a folder, or .onnx) in the background."""
        result = self.session.finetuned
        if result is None or (self.save_job is not None and not self.save_job.done):
            return None
        try:
            target = export_hf.check_path(path)
        except StudioError as exc:
            self._fail("Could not save the model", str(exc))
            return None
        model, protected = result.model, self.session.input_files()

        def work(progress: ProgressFn, cancel: CancelToken) -> Path:
            return export_hf.save_transformer(model, target, protected, progress, cancel)

        self.save_job = self.runner.start(f"Saving {target.name}", work)
        self._update_controls()
        return self.save_job

    def _ask_save_model(self) -> None:
        finetuned = self.session.finetuned
        if finetuned is not None and export_hf.is_hf(finetuned.model):
            suggested = f"{charts.model_stem(self.session)}-finetuned"
            filters = f"{export_hf.FOLDER_FILTER};;{export_hf.ONNX_FILTER}"
            path, _ = QFileDialog.getSaveFileName(self, "Save fine-tuned model", suggested, filters)
            if path:
                self.save_transformer(path)
            return
        model = self.session.model
        onnx = model is not None and model.kind == ONNX  # the model's own format first
        suffix = ".onnx" if onnx else ".pt"
        suggested = f"{charts.model_stem(self.session)}-finetuned{suffix}"
        title = "Save fine-tuned model"
        filters = ONNX_FIRST if onnx else MODEL_FILTER
        path, _ = QFileDialog.getSaveFileName(self, title, suggested, filters)
        if not path:
            return
        try:
            written = self.save_model(path)
        except StudioError as exc:
            self._fail("Could not save the model", str(exc))
            return
        self.session.log(f"Saved the fine-tuned model to {written}")
