"""The Training tab's settings form: optimizer, schedule, augmentation, distillation, stopping.

It only reads widgets into a :class:`FinetuneSettings` (which validates them with one-line
messages); it starts nothing. For a language model it shows the core's text defaults
(:meth:`FinetuneSettings.for_text`: AdamW at 3e-4, batches of 16 sequences, distillation at
T=1) and hides the image augmentation.
"""

from __future__ import annotations

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.core.train.types import OPTIMIZERS, SCHEDULES, FinetuneSettings

DEFAULTS = FinetuneSettings()
OPTIMIZER_LABELS = {"sgd": "SGD with momentum", "adamw": "AdamW"}
SCHEDULE_LABELS = {"cosine": "cosine", "step": "step decay", "constant": "constant"}


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _double(low: float, high: float, value: float, decimals: int, tip: str) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(10 ** -(decimals - 1) if decimals > 1 else 0.1)
    box.setValue(value)
    box.setToolTip(tip)
    return box


class TrainingForm(QWidget):
    """Widgets for every fine-tuning setting; :meth:`settings` reads them."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.epochs = _spin(1, 1000, DEFAULTS.epochs, "passes over the training data")
        self.batch_size = _spin(1, 8192, DEFAULTS.batch_size, "samples per step")
        self.optimizer = QComboBox()
        for key in OPTIMIZERS:
            self.optimizer.addItem(OPTIMIZER_LABELS[key], key)
        self.lr = _double(1e-6, 10.0, 0.01, 5, "peak learning rate, after the warm-up")
        self.optimizer.currentIndexChanged.connect(self._default_lr)
        self.schedule = QComboBox()
        for key in SCHEDULES:
            self.schedule.addItem(SCHEDULE_LABELS[key], key)
        self.warmup = _double(0.0, 100.0, DEFAULTS.warmup_epochs, 2, "epochs of linear warm-up")
        self.weight_decay = _double(0.0, 0.5, DEFAULTS.weight_decay, 5, "L2 weight decay")
        self.augment = QCheckBox("random shifts")
        self.augment.setChecked(DEFAULTS.augment == "shift")
        self.augment.setToolTip(f"shift each image by up to {DEFAULTS.shift_pixels} pixels")
        self.flips = QCheckBox("horizontal flips")
        self.flips.setToolTip("off by default: flips change digits and text")
        self.distill = QCheckBox("from the unpruned model")
        self.distill.setChecked(True)
        self.distill.setToolTip("knowledge distillation: match the original model's outputs")
        self.temperature = _double(0.1, 100.0, DEFAULTS.distill_temperature, 1, "softening")
        self.distill_weight = _double(
            0.0, 1.0, DEFAULTS.distill_weight, 2, "weight of distillation vs the labels' loss"
        )
        self.distill.toggled.connect(self._update)
        self.patience = _spin(0, 1000, 0, "stop after this many epochs with no improvement")
        self.patience.setSpecialValueText("off")

        training = QGroupBox("Optimisation")
        self._form = form = QFormLayout(training)
        form.addRow("Epochs", self.epochs)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Optimizer", self.optimizer)
        form.addRow("Learning rate", self.lr)
        form.addRow("Schedule", self.schedule)
        form.addRow("Warm-up (epochs)", self.warmup)
        form.addRow("Weight decay", self.weight_decay)
        form.addRow("Augmentation", self.augment)
        form.addRow("", self.flips)
        form.addRow("Early stopping", self.patience)
        distillation = QGroupBox("Distillation")
        dform = QFormLayout(distillation)
        dform.addRow("Distil", self.distill)
        dform.addRow("Temperature", self.temperature)
        dform.addRow("Weight", self.distill_weight)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(training)
        layout.addWidget(distillation)
        self._teacher_available = True
        self.text = False  # showing the defaults for a language model
        self._update()

    def use_defaults(self, text: bool) -> None:
        """Show the defaults for a language model (``text``) or for images, when the kind of
        model changes (edits made for one kind stay while it does not)."""
        if text == self.text:
            return
        self.text = text
        d = FinetuneSettings.for_text() if text else DEFAULTS
        self.epochs.setValue(d.epochs)
        self.batch_size.setValue(d.batch_size)
        self.optimizer.setCurrentIndex(self.optimizer.findData(d.optimizer))
        self.lr.setValue(d.learning_rate)
        self.schedule.setCurrentIndex(self.schedule.findData(d.schedule))
        self.warmup.setValue(d.warmup_epochs)
        self.weight_decay.setValue(d.weight_decay)
        self.augment.setChecked(d.augment == "shift")
        self.flips.setChecked(d.flips)
        self.temperature.setValue(d.distill_temperature)
        self.distill_weight.setValue(d.distill_weight)
        for widget in (self.augment, self.flips):
            self._form.setRowVisible(widget, not text)
        self.distill_weight.setToolTip(
            "weight of distillation vs the next-token loss"
            if text
            else "weight of distillation vs the labels' loss"
        )

    def set_teacher_available(self, available: bool, why: str = "") -> None:
        """Distillation needs the unpruned model; without one the options are disabled."""
        self._teacher_available = available
        self.distill.setToolTip(why if not available else "match the original model's outputs")
        self._update()

    @property
    def distilling(self) -> bool:
        return self._teacher_available and self.distill.isChecked()

    def settings(self) -> FinetuneSettings:
        """The settings as entered (raises StudioError with a one-line reason if invalid)."""
        return FinetuneSettings(
            epochs=self.epochs.value(),
            batch_size=self.batch_size.value(),
            optimizer=self.optimizer.currentData(),
            lr=self.lr.value(),
            schedule=self.schedule.currentData(),
            warmup_epochs=min(self.warmup.value(), float(self.epochs.value())),
            weight_decay=self.weight_decay.value(),
            augment="shift" if self.augment.isChecked() and not self.text else "none",
            flips=self.flips.isChecked() and not self.text,
            distill_temperature=self.temperature.value(),
            distill_weight=self.distill_weight.value() if self.distilling else 0.0,
            early_stopping_patience=self.patience.value() or None,
        )

    def _default_lr(self) -> None:
        optimizer = self.optimizer.currentData()
        self.lr.setValue(FinetuneSettings(optimizer=optimizer).learning_rate)

    def _update(self, *_args: object) -> None:
        self.distill.setEnabled(self._teacher_available)
        on = self.distilling
        self.temperature.setEnabled(on)
        self.distill_weight.setEnabled(on)
