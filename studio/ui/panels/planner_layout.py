"""The Planner tab's widgets: the plan and target rows, the options, the summary strip with
its actions, and the tables (CNN targets, or a transformer's layers) in a stack. A mix-in of
:class:`studio.ui.panels.planner_panel.PlannerPanel`, which provides the state, the latency
estimate and the commands the buttons call."""

from __future__ import annotations

from typing import Any

from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
)

from studio.core.latency.alignment import channel_multiple
from studio.core.plan.plan import CRITERIA, METHODS
from studio.ui.panels.planner_hf_table import TransformerTable
from studio.ui.panels.planner_table import PlannerTable
from studio.ui.widgets.scan_controls import narrow_combo

STRATEGIES = ("sensitivity", "global", "uniform")
ROUNDING = {"exact": 1, "×4": 4, "×8": 8, "×16": 16}
TARGET_KINDS = {"MACs": "macs", "parameters": "params", "latency (estimated)": "latency"}


class PlannerLayout:
    """Builds the Planner's widgets and connects them to the state and the commands."""

    state: Any
    latency: Any

    def _build(self) -> None:
        self.method = narrow_combo()
        self.method.addItems(list(METHODS))
        self.method.setToolTip(
            "structured: remove channels, filters, neurons and heads (smaller, faster)\n"
            "unstructured: zero single weights\nnm: 2 of every 4 weights zero (2:4)\n"
            "blocks: replace whole residual blocks by their shortcut"
        )
        self.criterion = narrow_combo()
        self.criterion.addItems(list(CRITERIA))
        self.criterion.setToolTip("Which channels or weights go first")
        self.cap = QDoubleSpinBox()
        self.cap.setRange(0.05, 1.0)
        self.cap.setSingleStep(0.05)
        self.cap.setValue(0.9)
        self.cap.setToolTip("No target may lose more than this fraction")
        self.recalibrate = QCheckBox("Re-estimate BN")
        self.recalibrate.setChecked(True)
        self.recalibrate.setToolTip(
            "After pruning, re-estimate batch-norm statistics on the data (no training);\n"
            "without it a heavily pruned network often falls to chance before fine-tuning"
        )
        self.kind = narrow_combo()
        self.kind.addItems(list(TARGET_KINDS))
        self.keep = QDoubleSpinBox()
        self.keep.setRange(1.0, 100.0)
        self.keep.setValue(50.0)
        self.keep.setSuffix(" % kept")
        self.strategy = narrow_combo()
        self.strategy.addItems(list(STRATEGIES))
        self.strategy.setToolTip(
            "sensitivity: meet the target with the smallest predicted drop (needs a scan)\n"
            "global: one importance threshold across layers\nuniform: the same ratio everywhere"
        )
        self.round_to = narrow_combo()
        runtime = channel_multiple("onnxruntime")
        self.round_to.addItem(f"runtime ×{runtime.multiple}", runtime.multiple)
        for label, value in ROUNDING.items():
            self.round_to.addItem(label, value)
        self.round_to.setToolTip(
            "Channel counts kept when allocating (structured). runtime: multiples of the block\n"
            f"ONNX Runtime runs fast on this machine ({runtime.reason}).\n"
            "Vectorised kernels (ONNX Runtime's NCHWc, oneDNN, tensor cores) run other counts\n"
            "on slower paths: the demo at half the MACs is 1.7x faster with x8, 0.95x exact."
        )
        self.allocate_button = QPushButton("Allocate")
        self.allocate_button.clicked.connect(self.allocate)
        plan_row, target_row = QHBoxLayout(), QHBoxLayout()
        labels: dict[str, QLabel] = {}
        for row, label, widget in (
            (plan_row, "Method", self.method),
            (plan_row, "Criterion", self.criterion),
            (plan_row, "Cap", self.cap),
            (target_row, "Target", self.kind),
            (target_row, "", self.keep),
            (target_row, "by", self.strategy),
        ):
            if label:
                labels[label] = QLabel(label)
                row.addWidget(labels[label])
            row.addWidget(widget)
        target_row.addWidget(self.allocate_button)
        plan_row.addStretch(1)
        target_row.addStretch(1)
        self.undo_button = self._button("Undo", self.state.undo_stack.undo, plan_row)
        self.undo_button.setShortcut(QKeySequence.StandardKey.Undo)
        self.redo_button = self._button("Redo", self.state.undo_stack.redo, plan_row)
        self.redo_button.setShortcut(QKeySequence.StandardKey.Redo)
        self.clear_button = self._button("Clear", self.clear, plan_row)
        self.clear_button.setToolTip("Set every ratio to 0")
        options_row = QHBoxLayout()
        options_row.addWidget(self.recalibrate)
        labels["Channels"] = QLabel("Channels")
        options_row.addWidget(labels["Channels"])
        options_row.addWidget(self.round_to)
        self.latency_button = QPushButton("Estimate latency")
        self.latency_button.setToolTip(
            "Predict the plan's ONNX Runtime latency on this machine on every change, from a\n"
            "lookup table of micro-benchmarks (run once per machine, then cached)"
        )
        self.latency_button.clicked.connect(lambda: self.latency.build(self.state.cost))
        options_row.addWidget(self.latency_button)
        options_row.addStretch(1)
        actions = QHBoxLayout()
        actions.addStretch(1)
        self.load_button = self._button("Load recipe…", self._ask_load_recipe, actions)
        self.save_button = self._button("Save recipe…", self._ask_save_recipe, actions)
        self.apply_button = self._button("Apply", self.apply, actions)
        self.apply_button.setStyleSheet("font-weight: 600")
        self.apply_button.setToolTip("Prune a copy of the model with this plan")
        self.revert_button = self._button("Revert", self.revert, actions)
        self.revert_button.setToolTip("Drop the pruned model; the original was never changed")

        self._cnn_only = [
            labels["Criterion"], self.criterion, labels["Cap"], self.cap, self.recalibrate,
            labels["Channels"], self.round_to, self.latency_button,
        ]  # fmt: skip
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.result_line = QLabel()  # a transformer's applied plan: parameters, perplexity
        self.result_line.setWordWrap(True)
        self.result_line.hide()
        strip = QFrame()
        strip.setFrameShape(QFrame.Shape.StyledPanel)
        strip.setStyleSheet("QFrame { background: #f4f7fb; }")
        strip_layout = QVBoxLayout(strip)
        strip_layout.addWidget(self.summary)
        strip_layout.addWidget(self.result_line)
        strip_layout.addLayout(actions)
        top = QVBoxLayout()
        top.addLayout(plan_row)
        top.addLayout(target_row)
        top.addLayout(options_row)

        self.table = PlannerTable(self.state)
        self.hf_table = TransformerTable(self.state)
        self.tables = QStackedWidget()
        self.tables.addWidget(self.table)
        self.tables.addWidget(self.hf_table)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(strip)
        layout.addWidget(self.tables, 1)
        self.method.currentTextChanged.connect(lambda _: self.rebuild())
        self.criterion.currentTextChanged.connect(lambda c: self.state.set_plan_fields(criterion=c))
        self.cap.valueChanged.connect(lambda v: self.state.set_plan_fields(cap=float(v)))
        self.round_to.currentIndexChanged.connect(
            lambda _i: self.state.set_plan_fields(round_to=int(self.round_to.currentData()))
        )
        self.recalibrate.toggled.connect(
            lambda on: self.state.set_plan_fields(recalibrate_bn=bool(on))
        )
        self.state.changed.connect(self._update_buttons)

    @staticmethod
    def _button(text: str, slot: Any, layout: QHBoxLayout) -> QPushButton:
        button = QPushButton(text)
        button.setMinimumWidth(button.fontMetrics().horizontalAdvance(text) + 18)
        button.clicked.connect(lambda _=False: slot())
        layout.addWidget(button)
        return button
