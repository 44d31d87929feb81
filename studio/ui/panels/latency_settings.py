"""The Latency tab's settings: runtime, device, batch, threads, the time budget per model,
and the target device profile (with its source, on one line: the whole of it in its tooltip)."""

from __future__ import annotations

import os

import torch
from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QPainter, QPaintEvent
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.latency.devices import DeviceProfile, list_devices
from studio.core.latency.measure import default_threads
from studio.ui.session import WARNING, Session

RUNTIMES = {"ONNX Runtime": "onnxruntime", "PyTorch (eager)": "torch"}


class ElidedLabel(QLabel):
    """One line of text cut at the label's width with "…" (a profile's source can run to
    several sentences; wrapped, it pushed the table of variants down)."""

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(0, super().minimumSizeHint().height())

    def shown_text(self) -> str:
        width = self.contentsRect().width()
        return self.fontMetrics().elidedText(self.text(), Qt.TextElideMode.ElideRight, width)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt's name
        align = int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        painter = QPainter(self)
        self.style().drawItemText(
            painter, self.contentsRect(), align, self.palette(), self.isEnabled(),
            self.shown_text(), self.foregroundRole(),
        )  # fmt: skip
        painter.end()


class LatencySettings(QWidget):
    """The rows of settings above the Latency tab's table (the tab listens to their changes)."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.profiles: list[DeviceProfile] = []
        self.runtime = QComboBox()
        self.runtime.addItems(list(RUNTIMES))
        self.device = QComboBox()
        self.device.addItem("CPU", "cpu")
        if torch.cuda.is_available():
            self.device.addItem(f"CUDA ({torch.cuda.get_device_name(0)})", "cuda")
        self.batch = self._spin(1, 4096, 1, "samples per inference")
        self.threads = self._spin(1, os.cpu_count() or 1, default_threads(), "intra-op threads")
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.2, 60.0)
        self.budget.setValue(2.0)
        self.budget.setSuffix(" s")
        self.budget.setToolTip("time budget per model: runs stop when the median is stable or here")
        self.target = QComboBox()
        self.target.setToolTip(
            "A target device's published figures (resources/devices, or your own YAML files in\n"
            "the user folder): a per-layer roofline estimate of latency and energy"
        )
        self.target.addItem("none", None)
        try:
            self.profiles = list_devices()
        except StudioError as exc:  # a bad user profile: say so, keep the bundled ones usable
            self.profiles = []
            self.session.log(f"Device profiles: {exc}", WARNING)
        for profile in self.profiles:
            self.target.addItem(profile.title, profile.name)
        self.source = ElidedLabel()
        self.source.setStyleSheet("color: #666666")
        row = QHBoxLayout()
        for label, widget in (
            ("Runtime", self.runtime),
            ("Device", self.device),
            ("Batch", self.batch),
            ("Threads", self.threads),
        ):
            row.addWidget(QLabel(label))
            row.addWidget(widget)
        row.addStretch(1)
        device_row = QHBoxLayout()
        device_row.addWidget(QLabel("Target device"))
        device_row.addWidget(self.target)
        device_row.addWidget(self.source, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addLayout(device_row)

    def _spin(self, low: int, high: int, value: int, tip: str) -> QSpinBox:
        box = QSpinBox()
        box.setRange(low, high)
        box.setValue(value)
        box.setToolTip(tip)
        return box
