"""The studio's main window: menus, the layer table, docks and the job status bar."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QTabWidget,
    QWidget,
)

from studio.core.cluster.connection import Compute
from studio.core.errors import StudioError
from studio.core.models import zoo
from studio.core.models.loaded import parse_shape
from studio.core.paths import DEMO_LM_DIR
from studio.ui.dialogs import export_actions
from studio.ui.dialogs.compute_dialog import ComputeDialog, load_compute
from studio.ui.panels.compare_panel import ComparePanel
from studio.ui.panels.latency_panel import LatencyPanel
from studio.ui.panels.layer_table import LayerTablePanel
from studio.ui.panels.log_panel import LogPanel
from studio.ui.panels.planner_panel import PlannerPanel
from studio.ui.panels.sensitivity_panel import SensitivityPanel
from studio.ui.panels.sparsity_panel import SparsityPanel
from studio.ui.panels.summary import SummaryPanel
from studio.ui.panels.training_panel import TrainingPanel
from studio.ui.progress import JobProgressWidget
from studio.ui.runner import JobRunner
from studio.ui.session import Session
from studio.ui.settings import RecentFiles, is_model_file, is_model_folder, studio_settings
from studio.ui.speed_watch import SpeedWatch
from studio.ui.text_data import DEMO_LM, is_text_spec
from studio.ui.workflow import ARCH, ModelRequest, Workflow

MODEL_FILTER = "Models (*.pt *.pth *.pt2 *.onnx *.ts);;All files (*)"
DATA_FILTER = "Arrays (*.npz)"
TEXT_FILTER = "Text (*.txt *.jsonl *.md);;All files (*)"
BUILTIN_SPECS = ("demo", "demo-lm")  # opened by name, not from a path
DEFAULT_SIZE = (1280, 800)
STATE_VERSION = 1
TABS = ("layers", "sensitivity", "sparsity", "planner", "result", "training", "latency")


class MainWindow(QMainWindow):
    """Top-level window. ``interactive=False`` (screenshots, scripts) shows no dialogs:
    errors are collected in ``errors`` and untrusted files are not loaded."""

    def __init__(
        self,
        settings: QSettings | None = None,
        interactive: bool = True,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Pruning Studio")
        self.setObjectName("MainWindow")
        self.interactive = interactive
        self.errors: list[str] = []
        self.settings = settings if settings is not None else studio_settings()
        self.recent = RecentFiles(self.settings)
        self.session = Session(self)
        self.runner = JobRunner(self)
        self.workflow = Workflow(self.session, self.runner, self)
        self.workflow.error.connect(self._on_error)
        self.workflow.model_loaded.connect(self._on_model_loaded)
        self.workflow.confirm_untrusted.connect(self._on_confirm_untrusted)
        self.workflow.needs_fact.connect(self._on_needs_fact)

        self.table = LayerTablePanel(self.session)
        self.sensitivity = SensitivityPanel(self.session, self.runner)
        self.sparsity = SparsityPanel(self.session, self.runner)
        self.planner = PlannerPanel(self.session, self.runner)
        self.result = ComparePanel(self.session)
        self.training = TrainingPanel(self.session, self.runner)
        self.latency = LatencyPanel(self.session, self.runner)
        panels = (self.sensitivity, self.sparsity, self.planner, self.result, self.training)
        for panel in (*panels, self.latency):
            panel.error.connect(self._on_error)
        self.planner.ask.connect(self._on_ask)
        self.speed_watch = SpeedWatch(self.session, self.runner, self)
        speed_lines = {"pruned": self.result.speed, "fine-tuned": self.training.speed}
        self.speed_watch.checking.connect(lambda kind: speed_lines[kind].show_pending(kind))
        self.speed_watch.checked.connect(lambda kind, check: speed_lines[kind].show_check(check))
        for line in speed_lines.values():
            line.fix.connect(self._replan_runtime)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.table, "Layers")
        self.tabs.addTab(self.sensitivity, "Sensitivity")
        self.tabs.addTab(self.sparsity, "Sparsity")
        self.tabs.addTab(self.planner, "Planner")
        self.tabs.addTab(self.result, "Result")
        self.tabs.addTab(self.training, "Training")
        self.tabs.addTab(self.latency, "Latency")
        self.session.pruned_changed.connect(
            lambda r: self.show_tab("result") if r is not None and self.interactive else None
        )
        self.setCentralWidget(self.tabs)
        self.summary = SummaryPanel(self.session)
        self.log_panel = LogPanel(self.session)
        self.summary_dock = self._dock(
            "Model summary", "SummaryDock", self.summary, Qt.DockWidgetArea.RightDockWidgetArea
        )
        self.log_dock = self._dock(
            "Log", "LogDock", self.log_panel, Qt.DockWidgetArea.BottomDockWidgetArea
        )
        self.progress = JobProgressWidget(self.runner)
        self.compute_label = QLabel()
        self.compute_label.setToolTip("Where scans and fine-tuning run: Settings ▸ Compute…")
        self.statusBar().addPermanentWidget(self.compute_label)
        self.statusBar().addPermanentWidget(self.progress)
        self.session.compute_changed.connect(self._show_compute)
        self.session.set_compute(load_compute(self.settings))
        self.session.model_changed.connect(self._update_title)
        self._build_menus()
        self.setAcceptDrops(True)
        self.resize(*DEFAULT_SIZE)
        self.resizeDocks([self.summary_dock], [330], Qt.Orientation.Horizontal)
        self.resizeDocks([self.log_dock], [170], Qt.Orientation.Vertical)
        if interactive:
            self._restore_layout()
        self.statusBar().showMessage(
            "Open a model to start: File ▸ Open model… or drop a file here"
        )

    # --- commands ------------------------------------------------------------------------

    def open_model(self, spec: str | ModelRequest, trust_pickle: bool = False) -> None:
        """Load a model spec (or a request with architecture, shape, trust) in the background."""
        path = spec.spec if isinstance(spec, ModelRequest) else spec
        if not (path in BUILTIN_SPECS or path.startswith("zoo:")) and not Path(path).exists():
            self.recent.remove(path)
            self._rebuild_recent_menu()
        self.workflow.open_model(spec, trust_pickle=trust_pickle)

    def open_data(self, spec: str) -> None:
        self.workflow.open_data(spec)

    def show_tab(self, name: str) -> None:
        """Bring the tab ``layers``, ``sensitivity`` or ``sparsity`` to the front."""
        for i in range(self.tabs.count()):
            if self.tabs.tabText(i).lower() == name.lower():
                self.tabs.setCurrentIndex(i)
                return
        raise ValueError(f"no tab named {name!r}: choose one of {', '.join(TABS)}")

    def open_model_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open model", self._last_dir(), MODEL_FILTER)
        if path:
            self.open_model(path)

    def open_model_folder_dialog(self) -> None:
        """A Hugging Face model folder (config.json and *.safetensors)."""
        path = QFileDialog.getExistingDirectory(self, "Open model folder", self._last_dir())
        if path:
            self.open_model(path)

    def open_text_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open text", self._last_dir(), TEXT_FILTER)
        if path:
            self.open_data(path)

    def open_data_folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open image folder", self._last_dir())
        if path:
            self.open_data(path)

    def open_data_file_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open data", self._last_dir(), DATA_FILTER)
        if path:
            self.open_data(path)

    def open_compute_dialog(self) -> ComputeDialog:
        dialog = ComputeDialog(self.session, self.runner, self.settings, self)
        if self.interactive:
            dialog.open()
        return dialog

    # --- menus ---------------------------------------------------------------------------

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        self._action(
            file_menu, "&Open model…", self.open_model_dialog, QKeySequence.StandardKey.Open
        )
        self._action(
            file_menu, "Open model &folder (Hugging Face)…", self.open_model_folder_dialog
        ).setShortcut(QKeySequence("Ctrl+Shift+O"))
        builtin = file_menu.addMenu("&Built-in model")
        self._action(builtin, "Demo: ResNet-20 trained on digits", partial(self.open_model, "demo"))
        demo_lm = self._action(
            builtin, "Demo LM: Llama-style (GQA) on Python docs", partial(self.open_model, DEMO_LM)
        )
        demo_lm.setEnabled((DEMO_LM_DIR / "config.json").is_file())
        builtin.addSeparator()
        for name in zoo.NAMES:
            self._action(
                builtin, f"{name} (random weights)", partial(self.open_model, f"zoo:{name}")
            )
        self.recent_menu = file_menu.addMenu("Open &recent")
        self._rebuild_recent_menu()
        file_menu.addSeparator()
        data_menu = file_menu.addMenu("Open &data")
        self._action(data_menu, "Demo digits (validation split)", partial(self.open_data, "demo"))
        self._action(data_menu, "Image folder…", self.open_data_folder_dialog)
        self._action(data_menu, "Array file (.npz)…", self.open_data_file_dialog)
        data_menu.addSeparator()
        self._action(data_menu, "Demo LM corpus (text)", partial(self.open_data, DEMO_LM))
        self._action(data_menu, "Text file (.txt, .jsonl)…", self.open_text_dialog)
        file_menu.addSeparator()
        self._action(
            file_menu, "&Export…", partial(export_actions.open_export_dialog, self)
        ).setShortcut(QKeySequence("Ctrl+E"))
        self._action(
            file_menu, "Export re&port…", partial(export_actions.export_report_dialog, self)
        )
        file_menu.addSeparator()
        self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        view_menu = self.menuBar().addMenu("&View")
        for i, name in enumerate(TABS, 1):
            self._action(view_menu, f"&{name.title()}", partial(self.show_tab, name)).setShortcut(
                QKeySequence(f"Ctrl+{i}")
            )
        view_menu.addSeparator()
        self._action(view_menu, "&Graphs (Netron)…", partial(export_actions.open_graphs, self))
        view_menu.addSeparator()
        view_menu.addAction(self.summary_dock.toggleViewAction())
        view_menu.addAction(self.log_dock.toggleViewAction())
        settings_menu = self.menuBar().addMenu("&Settings")
        self._action(settings_menu, "&Compute (this machine or Ray)…", self.open_compute_dialog)

    def _action(
        self, menu: QMenu, text: str, slot: object, shortcut: QKeySequence.StandardKey | None = None
    ) -> QAction:
        action = menu.addAction(text)
        action.triggered.connect(lambda _checked=False: slot())  # type: ignore[operator]
        if shortcut is not None:
            action.setShortcut(shortcut)
        return action

    def _rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        paths = self.recent.paths()
        for i, path in enumerate(paths, 1):
            action = self._action(
                self.recent_menu, f"&{i % 10} {Path(path).name}", partial(self.open_model, path)
            )
            action.setToolTip(path)
            action.setStatusTip(path)
        if paths:
            self.recent_menu.addSeparator()
            self._action(self.recent_menu, "Clear list", self._clear_recent)
        self.recent_menu.setEnabled(bool(paths))

    def _clear_recent(self) -> None:
        self.recent.clear()
        self._rebuild_recent_menu()

    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    # --- reactions -----------------------------------------------------------------------

    def _show_compute(self, compute: Compute) -> None:
        self.compute_label.setText(f"Compute: {compute.describe()}")

    def _on_model_loaded(self, spec: str) -> None:
        if spec not in BUILTIN_SPECS and not spec.startswith("zoo:") and Path(spec).exists():
            self.recent.add(spec)
            self.settings.setValue("lastDir", str(Path(spec).resolve().parent))
            self._rebuild_recent_menu()
        self.statusBar().clearMessage()

    def _on_error(self, title: str, message: str) -> None:
        self.errors.append(message)
        if self.interactive:
            # shown after the runner's slot returns, not from inside it; dropped if the
            # window is gone by then
            QTimer.singleShot(0, self, lambda: QMessageBox.critical(self, title, message))

    def _replan_runtime(self) -> None:
        """The speed line's fix: the Planner allocates its target again with runtime channels
        and applies the result."""
        self.show_tab("planner")
        self.planner.replan_runtime()

    def _on_ask(self, title: str, question: str, on_yes: Callable[[], object]) -> None:
        """A panel's yes/no question (without a person at the window: yes)."""
        if not self.interactive:
            on_yes()
            return

        def ask() -> None:
            answer = QMessageBox.question(
                self,
                title,
                question,
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.Yes,
            )
            if answer == QMessageBox.StandardButton.Yes:
                on_yes()

        QTimer.singleShot(0, self, ask)

    def _on_confirm_untrusted(self, request: ModelRequest, question: str) -> None:
        if not self.interactive:
            self.errors.append(f"{request.spec} is a pickled object that can run code; not loaded")
            return
        QTimer.singleShot(0, self, lambda: self._ask_untrusted(request, question))

    def _ask_untrusted(self, request: ModelRequest, question: str) -> None:
        answer = QMessageBox.question(
            self,
            "Load untrusted file?",
            question,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        if answer == QMessageBox.StandardButton.Yes:
            self.open_model(replace(request, trust_pickle=True))
        else:
            self.session.log(f"Not loading {request.spec}")

    def _on_needs_fact(self, request: ModelRequest, fact: str, message: str) -> None:
        if not self.interactive:
            self.errors.append(message)
            return
        QTimer.singleShot(0, self, lambda: self._ask_fact(request, fact, message))

    def _ask_fact(self, request: ModelRequest, fact: str, message: str) -> None:
        """Ask for the architecture of a state_dict or the input shape of a module, then retry."""
        name = Path(request.spec).name
        if fact == ARCH:
            arch, ok = QInputDialog.getItem(
                self,
                "Choose the architecture",
                f"{name} holds weights only. Which built-in architecture are they for?",
                list(zoo.NAMES),
                0,
                False,
            )
            if ok and arch:
                self.open_model(replace(request, arch=arch))
            return
        current = ",".join(str(d) for d in request.input_shape) if request.input_shape else ""
        text, ok = QInputDialog.getText(
            self,
            "Input shape",
            f"{message}\n\nInput shape, batch first (for example 1,3,224,224):",
            text=current or "1,3,224,224",
        )
        if not ok:
            return
        try:
            shape = parse_shape(text)
        except StudioError as exc:
            self._on_error("Bad input shape", str(exc))
            return
        self.open_model(replace(request, input_shape=shape))

    def _update_title(self, *_args: object) -> None:
        model = self.session.model
        self.setWindowTitle(f"{model.name} — Pruning Studio" if model else "Pruning Studio")

    # --- drag and drop -------------------------------------------------------------------

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if self._dropped(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        dropped = self._dropped(event)
        if dropped is not None:
            event.acceptProposedAction()
            kind, path = dropped
            if kind == "model":
                self.open_model(path)
            else:
                self.open_data(path)

    @staticmethod
    def _dropped(event: QDragEnterEvent | QDropEvent) -> tuple[str, str] | None:
        """("model", path) for a model file or a Hugging Face folder, ("data", path) for a
        text file; None for anything else."""
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        files = [u.toLocalFile() for u in urls if u.isLocalFile()]
        if len(files) != 1:
            return None
        path = files[0].rstrip("/") or files[0]
        if is_model_file(path) or is_model_folder(path):
            return ("model", path)
        return ("data", path) if is_text_spec(path) and Path(path).is_file() else None

    # --- persistence ---------------------------------------------------------------------

    def _last_dir(self) -> str:
        return str(self.settings.value("lastDir", str(Path.home())))

    def _restore_layout(self) -> None:
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        if isinstance(state, QByteArray):
            self.restoreState(state, STATE_VERSION)

    def save_layout(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState(STATE_VERSION))
        self.settings.sync()

    def closeEvent(self, event: QCloseEvent) -> None:
        """Cancel running jobs, wait for their threads, and remember the layout."""
        if self.runner.is_busy():
            self.statusBar().showMessage("Cancelling running jobs…")
        export_actions.close_all(self)
        self.runner.shutdown(timeout=60.0)
        if self.interactive:
            self.save_layout()
        super().closeEvent(event)
