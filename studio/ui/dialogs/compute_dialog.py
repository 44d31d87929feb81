"""Settings ▸ Compute…: run scans and fine-tuning on this machine or on a Ray cluster.

The choice is the session's :class:`~studio.core.cluster.connection.Compute`, kept in the studio's
settings. "Check connection" starts or joins Ray in the background
(:func:`studio.core.cluster.connection.check_connection`) and lists the cluster's nodes with their
CPUs and GPUs; a failure is one line in the dialog. Without Ray installed the Ray choice is off and
the dialog names the command that installs it. Choosing this machine again ends the Ray
connection (a local instance stops) once no job is running.
"""

from __future__ import annotations

import html
import os

from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from studio.core.cluster.connection import (
    INSTALL_HINT,
    Cluster,
    ClusterInfo,
    Compute,
    check_connection,
    ray_available,
)
from studio.core.errors import StudioError
from studio.ui.runner import Job, JobRunner
from studio.ui.session import Session

ADDRESS_KEY, WORKERS_KEY = "compute/rayAddress", "compute/workers"
SUGGESTIONS = ("local", "auto")
NODE_COLUMNS = ("Node", "CPUs", "GPUs", "State")
RIGHT = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter


def load_compute(settings: QSettings) -> Compute:
    """The compute choice saved in the settings (this machine when none, or Ray is missing)."""
    address = str(settings.value(ADDRESS_KEY, "") or "").strip()
    try:
        workers = int(settings.value(WORKERS_KEY, 0) or 0)
    except (TypeError, ValueError):
        workers = 0
    if not address or not ray_available():
        return Compute()
    return Compute(address, workers or None)


def save_compute(settings: QSettings, compute: Compute) -> None:
    settings.setValue(ADDRESS_KEY, compute.address or "")
    settings.setValue(WORKERS_KEY, compute.workers or 0)
    settings.sync()


class ComputeDialog(QDialog):
    """Choose where long jobs run; check a Ray address and see what the cluster has."""

    def __init__(
        self, session: Session, runner: JobRunner, settings: QSettings, parent=None
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Compute")
        self.session, self.runner, self.settings = session, runner, settings
        self.job: Job | None = None
        self.info: ClusterInfo | None = None
        current = session.compute

        self.here = QRadioButton(f"This machine ({os.cpu_count() or 1} cores)")
        self.ray = QRadioButton("A Ray cluster")
        self.address = QComboBox()
        self.address.setEditable(True)
        self.address.addItems(SUGGESTIONS)
        self.address.lineEdit().setPlaceholderText("local, auto, ray://HOST:PORT or HOST:PORT")
        self.address.setToolTip(
            "local: start Ray on this machine (loopback only, token authentication on)\n"
            "auto: the cluster this machine joined with `ray start`\n"
            "ray://HOST:PORT (Ray client) or HOST:PORT (the head node)"
        )
        self.address.setCurrentText(current.address or "local")
        self.workers = QSpinBox()
        self.workers.setRange(0, 4096)
        self.workers.setSpecialValueText("one per CPU")
        self.workers.setValue(current.workers or 0)
        self.workers.setToolTip("Ray workers for a scan (and data-parallel workers for training)")
        self.check = QPushButton("Check connection")
        self.check.clicked.connect(self.check_connection)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.nodes = QTableWidget(0, len(NODE_COLUMNS))
        self.nodes.setHorizontalHeaderLabels(NODE_COLUMNS)
        self.nodes.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.nodes.verticalHeader().hide()
        self.nodes.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.nodes.setMinimumHeight(110)

        form = QFormLayout()
        form.addRow("Address", self.address)
        form.addRow("Workers", self.workers)
        check_row = QHBoxLayout()
        check_row.addWidget(self.check)
        check_row.addStretch(1)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.here)
        layout.addWidget(self.ray)
        layout.addLayout(form)
        layout.addLayout(check_row)
        layout.addWidget(self.status)
        layout.addWidget(self.nodes, 1)
        layout.addWidget(buttons)

        (self.ray if current.on_ray else self.here).setChecked(True)
        if not ray_available():
            self.ray.setEnabled(False)
            self.here.setChecked(True)
            self._show(f"Ray is not installed. To use a cluster, install it with: {INSTALL_HINT}")
        self.here.toggled.connect(self._update)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(self._on_failed)
        self._update()
        self.resize(520, 380)

    def chosen(self) -> Compute:
        """The choice in the dialog (an error for an address that cannot name a cluster)."""
        if not self.ray.isChecked():
            return Compute()
        from studio.core.cluster.connection import check_address

        return Compute(check_address(self.address.currentText()), self.workers.value() or None)

    def check_connection(self) -> Job | None:
        """Start or join Ray at the address in the background; the nodes fill the table."""
        try:
            address = self.chosen().address
        except StudioError as exc:
            self._show(str(exc), error=True)
            return None
        if address is None or (self.job is not None and not self.job.done):
            return None
        self._show(f"Connecting to Ray ({address})…")
        self.check.setEnabled(False)
        self.job = self.runner.start(
            f"Ray connection check ({address})",
            lambda progress, cancel: check_connection(address),
            isolate=False,  # the connection is the window's
        )
        return self.job

    def accept(self) -> None:
        try:
            compute = self.chosen()
        except StudioError as exc:
            self._show(str(exc), error=True)
            return
        self.session.set_compute(compute)
        save_compute(self.settings, compute)
        self.session.log(f"Scans and fine-tuning run on {compute.describe()}")
        self._release(compute)
        super().accept()

    def _release(self, compute: Compute) -> Job | None:
        """Back on this machine: end the Ray connection (stopping a local instance and the
        memory it holds) in the background, unless a job may still be using it."""
        if compute.on_ray or Cluster._current is None or self.runner.is_busy():
            return None
        return self.runner.start(
            "Stopping Ray", lambda progress, cancel: Cluster.shutdown(), isolate=False
        )

    # --- reactions -----------------------------------------------------------------------

    def _update(self) -> None:
        on_ray = self.ray.isChecked()
        for widget in (self.address, self.workers, self.check, self.nodes):
            widget.setEnabled(on_ray)

    def _on_finished(self, job: Job, result: object) -> None:
        if job is not self.job or not isinstance(result, ClusterInfo):
            return
        self.info = result
        self.check.setEnabled(True)
        self._show(f"Connected: {result.where()}")
        self.nodes.setRowCount(len(result.nodes))
        for row, node in enumerate(result.nodes):
            state = ("alive" if node.alive else "dead") + (", head" if node.head else "")
            for col, text in enumerate((node.host, f"{node.cpus:g}", f"{node.gpus:g}", state)):
                item = QTableWidgetItem(text)
                if col in (1, 2):
                    item.setTextAlignment(RIGHT)
                self.nodes.setItem(row, col, item)

    def _on_failed(self, job: Job, message: str) -> None:
        if job is not self.job:
            return
        self.check.setEnabled(True)
        self.nodes.setRowCount(0)
        self._show(message, error=True)

    def _show(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "palette(text)"
        self.status.setText(f"<span style='color:{colour}'>{html.escape(text)}</span>")
