"""The settings row of the Sensitivity tab: mode, method, metric, criterion, ratios, cache."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.scan.types import CRITERIA, METHODS, MODES, ScanSettings

METRIC_NAMES = {"accuracy": "Accuracy", "loss": "Loss", "fidelity": "Fidelity (agreement)"}
TIPS = {
    "mode": "structured: channels, filters, neurons and heads, per dependency group\n"
    "unstructured: single weights, per tensor\nnm: N of every 4 weights (0.5 = 2:4)",
    "method": "exact: every cell measured, several times faster than naive\n"
    "naive: the same numbers the slow way (copy, prune, evaluate)\n"
    "taylor: a first-order estimate of the loss increase, in seconds",
    "metric": "accuracy: drop in top-1 accuracy\nloss: increase in cross-entropy\n"
    "fidelity: drop in top-1 agreement with the unpruned model (no labels needed)",
    "criterion": "Which channels or weights go first: the smallest by L2 or L1 magnitude",
    "ratios": "Fractions to prune, separated by commas",
    "cache": "Reuse cells measured before for this model, data and settings,\n"
    "and resume a cancelled scan where it stopped",
}


def parse_ratios(text: str) -> tuple[float, ...]:
    """``"0.1, 0.2,0.5"`` -> ``(0.1, 0.2, 0.5)``, with a clear message for anything else."""
    try:
        ratios = tuple(float(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise StudioError(f"ratios must be numbers separated by commas, not {text!r}") from None
    if not ratios:
        raise StudioError("give at least one ratio, for example 0.1,0.2,0.5")
    return tuple(sorted(set(ratios)))


def ratios_text(ratios: tuple[float, ...]) -> str:
    return ",".join(f"{r:g}" for r in ratios)


def narrow_combo(characters: int = 6) -> QComboBox:
    """A combo box that may shrink below its longest item, so the window can be narrow."""
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(characters)
    return combo


class ScanControls(QWidget):
    """Edits a :class:`ScanSettings`; the metric can change after a scan (rows keep all)."""

    metric_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.mode = self._combo(MODES, TIPS["mode"])
        self.method = self._combo(METHODS, TIPS["method"])
        self.metric = narrow_combo()
        for key, name in METRIC_NAMES.items():
            self.metric.addItem(name, key)
        self.metric.setToolTip(TIPS["metric"])
        self.criterion = self._combo(CRITERIA, TIPS["criterion"])
        self.ratios = QLineEdit(ratios_text(ScanSettings.default_ratios("structured")))
        self.ratios.setToolTip(TIPS["ratios"])
        self.ratios.setMinimumWidth(80)
        self.use_cache = QCheckBox("Use cache")
        self.use_cache.setChecked(True)
        self.use_cache.setToolTip(TIPS["cache"])
        first, second = QHBoxLayout(), QHBoxLayout()
        for row, label, widget in (
            (first, "Mode", self.mode),
            (first, "Method", self.method),
            (first, "Metric", self.metric),
            (first, "Criterion", self.criterion),
            (second, "Ratios", self.ratios),
        ):
            row.addWidget(QLabel(label))
            row.addWidget(widget, 1)
        second.addWidget(self.use_cache)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(first)
        layout.addLayout(second)
        self._preferred_metric = "accuracy"  # what the user last chose, when the data allows
        self._labelled = True
        self._method_fixed: str | None = None
        self.mode.currentTextChanged.connect(self._on_mode_changed)
        self.method.currentTextChanged.connect(lambda _: self.allow_metrics())
        self.metric.currentIndexChanged.connect(lambda _: self.metric_changed.emit(self.metric_key))
        self.metric.activated.connect(self._on_metric_chosen)

    @staticmethod
    def _combo(items: tuple[str, ...], tip: str) -> QComboBox:
        combo = narrow_combo()
        combo.addItems(list(items))
        combo.setToolTip(tip)
        return combo

    @property
    def metric_key(self) -> str:
        return str(self.metric.currentData())

    def settings(self) -> ScanSettings:
        """The settings the controls describe (raises StudioError for bad input)."""
        return ScanSettings(
            mode=self.mode.currentText(),
            metric=self.metric_key,
            method=self.method.currentText(),
            ratios=parse_ratios(self.ratios.text()),
            criterion=self.criterion.currentText(),
        )

    def set_running(self, running: bool) -> None:
        """While a scan runs only the metric (a view of its rows) can change."""
        for widget in (self.mode, self.method, self.criterion, self.ratios, self.use_cache):
            widget.setEnabled(not running)

    def allow_metrics(self, labelled: bool | None = None, method: str | None = None) -> None:
        """Enable the metrics the data and method can give: taylor estimates the loss only;
        unlabeled data has no accuracy. ``method`` pins the method of the scan on show."""
        if labelled is not None:
            self._labelled = labelled
        if method is not None:
            self._method_fixed = method
        method = self._method_fixed or self.method.currentText()
        allowed = {"loss"} if method == "taylor" else {"loss", "fidelity"}
        if method != "taylor" and self._labelled:
            allowed.add("accuracy")
        model = self.metric.model()
        for i in range(self.metric.count()):
            model.item(i).setEnabled(self.metric.itemData(i) in allowed)  # type: ignore[attr-defined]
        wanted = self._preferred_metric if self._preferred_metric in allowed else None
        if wanted is None and self.metric_key not in allowed:
            wanted = "accuracy" if "accuracy" in allowed else "loss"
        if wanted is not None and wanted != self.metric_key:
            self.metric.setCurrentIndex(self.metric.findData(wanted))

    def release_method(self) -> None:
        """No scan is on show any more: the metric follows the method combo again."""
        self._method_fixed = None
        self.allow_metrics()

    def _on_metric_chosen(self, index: int) -> None:
        self._preferred_metric = str(self.metric.itemData(index))

    def _on_mode_changed(self, mode: str) -> None:
        self.ratios.setText(ratios_text(ScanSettings.default_ratios(mode)))
