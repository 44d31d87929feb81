"""Model summary dock: what is loaded, how big it is, and how well it does on the data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QLabel, QVBoxLayout, QWidget

from studio.ui import format as fmt

if TYPE_CHECKING:
    from studio.core.models.evaluate import EvalResult
    from studio.ui.session import Session

FIELDS = (
    ("model", "Model"),
    ("kind", "Kind"),
    ("params", "Parameters"),
    ("macs", "MACs"),
    ("size", "Size on disk"),
    ("input", "Input shape"),
    ("layers", "Layers"),
    ("sparsity", "Sparsity"),
    ("data", "Data"),
    ("quality", "Accuracy"),
    ("quality2", "Loss"),
)
KIND_TEXT = {
    "eager": "PyTorch (eager)",
    "torchscript": "TorchScript",
    "exported": "torch.export program",
    "onnx": "ONNX (converted to PyTorch)",
    "huggingface": "Hugging Face folder",
}


class SummaryPanel(QWidget):
    """Key facts about the session's model, inventory, data and evaluation."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.form = QFormLayout()
        self.form.setLabelAlignment(Qt.AlignmentFlag.AlignRight)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.labels: dict[str, QLabel] = {}
        self.values: dict[str, QLabel] = {}
        for key, title in FIELDS:
            label, value = QLabel(title + ":"), QLabel(fmt.DASH)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value.setWordWrap(True)
            self.labels[key], self.values[key] = label, value
            self.form.addRow(label, value)
        self.values["model"].setStyleSheet("font-weight: 600")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.addLayout(self.form)
        layout.addStretch(1)
        for signal in (
            session.model_changed,
            session.inventory_changed,
            session.data_changed,
            session.evaluation_changed,
        ):
            signal.connect(self.refresh)
        self.refresh()

    def text(self, key: str) -> str:
        """The value shown for ``key`` (one of the keys of ``FIELDS``)."""
        return self.values[key].text()

    def refresh(self, *_args: object) -> None:
        s = self.session
        model, inventory, data, result = s.model, s.inventory, s.data, s.evaluation
        v = self.values
        if model is None:
            for value in v.values():
                value.setText(fmt.DASH)
            v["model"].setText("No model loaded — File ▸ Open model…")
        else:
            v["model"].setText(model.name)
            v["model"].setToolTip(str(model.path) if model.path else model.spec)
            kind = KIND_TEXT.get(model.kind, model.kind)
            v["kind"].setText(f"{kind} ({model.task})" if model.task else kind)
            v["input"].setText(fmt.shape(model.input_shape))
            size = _size_on_disk(model.path) if model.path else None
            v["size"].setText(fmt.file_size(size) if model.path else "not a file")
            params = (
                inventory.params if inventory else sum(p.numel() for p in model.module.parameters())
            )
            v["params"].setText(fmt.count(params))
        if model is not None and inventory is None:
            for key in ("macs", "layers", "sparsity"):
                v[key].setText("…")
        elif inventory is not None:
            v["macs"].setText(fmt.count(inventory.macs))
            prunable = sum(1 for layer in inventory.layers if layer.prunable)
            v["layers"].setText(
                f"{len(inventory.layers)} ({prunable} prunable, {len(inventory.groups)} groups)"
            )
            v["sparsity"].setText(fmt.percent(inventory.sparsity))
        if data is None:
            v["data"].setText(fmt.DASH)
        elif s.is_text_data:
            calibration = len(s.calibration) if s.calibration is not None else 0
            v["data"].setText(
                f"{data.name}: {len(data):,} sequences ({calibration:,} more for calibration)"
            )
        else:
            unlabeled = "" if data.labelled else ", unlabeled"
            v["data"].setText(f"{data.name}: {len(data):,} samples{unlabeled}")
        self._show_quality(result)

    def _show_quality(self, result: EvalResult | None) -> None:
        s, v, lbl = self.session, self.values, self.labels
        labelled = s.data is None or s.data.labelled
        lm = s.model is not None and s.model.task == "causal-lm"
        lbl["quality"].setText("Perplexity:" if lm else "Accuracy:" if labelled else "Agreement:")
        lbl["quality2"].setText("Loss:" if labelled or lm else "KL / cosine:")
        if result is None:
            waiting = s.model is not None and s.data is not None
            v["quality"].setText("…" if waiting else fmt.DASH)
            v["quality2"].setText("…" if waiting else fmt.DASH)
            v["quality"].setToolTip("" if s.data is not None else "Open data to measure accuracy")
            return
        n = result.samples
        if result.perplexity is not None:
            v["quality"].setText(f"{result.perplexity:.3f}  on {n:,} sequences (validation)")
            loss = result.loss
            v["quality2"].setText(fmt.DASH if loss is None else f"{loss:.4f} nats a token")
        elif labelled:
            v["quality"].setText(f"{fmt.percent(result.accuracy, 2)}  on {n:,} samples")
            loss = result.loss
            v["quality2"].setText(fmt.DASH if loss is None else f"{loss:.4f}")
        else:
            v["quality"].setText(
                f"{fmt.percent(result.agreement, 2)}  top-1 agreement with the original model"
            )
            kl, cos = result.kl, result.cosine
            v["quality2"].setText(fmt.DASH if kl is None else f"{kl:.4g} / {cos:.4f}")


def _size_on_disk(path: Path) -> int | None:
    """A model file's size, or the total of a model folder's files (a Hugging Face folder)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else None
