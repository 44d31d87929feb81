"""The Planner's table: one row per target with a ratio slider, a lock, costs before -> after
and the predicted drop as a small bar coloured like the sensitivity heatmap."""

from __future__ import annotations

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, QRect, Qt
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHeaderView,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from studio.core.plan.allocate import PlanTarget
from studio.ui import format as fmt
from studio.ui.panels import scan_text
from studio.ui.panels.planner_hf import TransformerCost
from studio.ui.panels.planner_state import PlannerState, Prediction
from studio.ui.widgets.heatmap import HEAT

COLUMNS = ("Target", "Ratio", "Lock", "Parameters", "MACs", "Predicted drop")
NAME, RATIO, LOCK, PARAMS, MACS, DROP = range(len(COLUMNS))
BAR_ROLE = Qt.ItemDataRole.UserRole + 1  # bar length in [0, 1] for the drop column
STEP = 0.01


class DropBarDelegate(QStyledItemDelegate):
    """Paints a bar of length ``BAR_ROLE`` behind the cell's text, coloured by its length."""

    def paint(
        self,
        painter: QPainter,
        option: QStyleOptionViewItem,
        index: QModelIndex | QPersistentModelIndex,
    ) -> None:
        fraction = index.data(BAR_ROLE)
        if isinstance(fraction, float) and fraction > 0:
            rect = QRect(option.rect.adjusted(2, 4, -2, -4))
            rect.setWidth(max(2, int(rect.width() * min(fraction, 1.0))))
            painter.save()
            painter.fillRect(rect, QColor(HEAT.map(0.1 + 0.45 * min(fraction, 1.0), "qcolor")))
            painter.restore()
        super().paint(painter, option, index)


class PlannerTable(QTableWidget):
    """Rows follow ``state.targets``; sliders edit ``state`` and show its ratios."""

    def __init__(self, state: PlannerState, parent: QWidget | None = None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.state = state
        self.sliders: dict[str, QLabeledDoubleSlider] = {}
        self.locks: dict[str, QCheckBox] = {}
        self._pressed: dict[str, float] = {}
        self.setHorizontalHeaderLabels(list(COLUMNS))
        self.verticalHeader().setVisible(False)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setItemDelegateForColumn(DROP, DropBarDelegate(self))
        header = self.horizontalHeader()
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(RATIO, QHeaderView.ResizeMode.Stretch)
        for column in (LOCK, PARAMS, MACS, DROP):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setMinimumSectionSize(60)
        state.reset.connect(self.rebuild)
        state.changed.connect(self.refresh)

    def rebuild(self) -> None:
        """One row per target of the state's cost model."""
        self.setRowCount(0)
        self.sliders.clear()
        self.locks.clear()
        # a transformer's layers are shown by TransformerTable
        targets = [] if isinstance(self.state.cost, TransformerCost) else self.state.targets
        self.setRowCount(len(targets))
        for row, target in enumerate(targets):
            item = QTableWidgetItem(target.name)
            item.setToolTip(self._target_tip(target))
            self.setItem(row, NAME, item)
            self.setCellWidget(row, RATIO, self._slider(target.name))
            lock = QCheckBox()
            lock.setToolTip("Locked ratios are left alone by Allocate")
            lock.toggled.connect(lambda on, n=target.name: self.state.set_locked(n, on))
            self.locks[target.name] = lock
            self.setCellWidget(row, LOCK, lock)
            for column in (PARAMS, MACS, DROP):
                cell = QTableWidgetItem()
                cell.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(row, column, cell)
        self.refresh()

    def _slider(self, name: str) -> QLabeledDoubleSlider:
        slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        slider.setRange(0.0, self._limit())
        slider.setSingleStep(STEP)
        slider.setDecimals(2)
        slider.setMinimumWidth(160)
        slider.sliderPressed.connect(
            lambda n=name: self._pressed.__setitem__(n, self.state.plan.ratio(n))
        )
        slider.sliderReleased.connect(lambda n=name: self._released(n))
        slider.valueChanged.connect(lambda value, n=name: self._moved(n, value))
        self.sliders[name] = slider
        return slider

    def _limit(self) -> float:
        plan = self.state.plan
        return 1.0 if plan.method == "blocks" else plan.cap

    def _moved(self, name: str, value: float) -> None:
        current = self.state.plan.ratio(name)
        if abs(current - value) < 1e-9:
            return
        if self.sliders[name].isSliderDown():
            self.state.preview_ratio(name, value)
        else:  # keyboard, wheel, or a value typed into the label
            self.state.commit_ratio(name, current, value)

    def _released(self, name: str) -> None:
        before = self._pressed.pop(name, self.state.plan.ratio(name))
        self.state.commit_ratio(name, before, float(self.sliders[name].value()))

    def refresh(self) -> None:
        """Show the state's ratios, locks and predictions."""
        plan = self.state.plan
        prediction = self.state.predict()
        limit = self._limit()
        drops = prediction.target_drops if prediction else {}
        top = max((abs(v) for v in drops.values()), default=0.0)
        metric = self.state.report.settings.metric if self.state.report else "accuracy"
        for row, target in enumerate(self.state.targets):
            slider = self.sliders.get(target.name)
            if slider is None:
                continue
            if abs(slider.maximum() - limit) > 1e-9:
                slider.setRange(0.0, limit)
            ratio = plan.ratio(target.name)
            if abs(slider.value() - ratio) > 1e-9 and not slider.isSliderDown():
                slider.blockSignals(True)
                slider.setValue(ratio)
                slider.blockSignals(False)
            show_lock(self.locks[target.name], target.name in plan.locked)
            slider.setEnabled(target.name not in plan.ignored)
            self._costs(row, target, prediction)
            drop_item = self.item(row, DROP)
            if target.name in drops:
                value = drops[target.name]
                drop_item.setText(scan_text.drop_text(metric, value))
                drop_item.setData(BAR_ROLE, float(abs(value) / top) if top > 0 else 0.0)
            else:
                drop_item.setText(fmt.DASH)
                drop_item.setData(BAR_ROLE, 0.0)

    def _costs(self, row: int, target: PlanTarget, prediction: Prediction | None) -> None:
        removed_p = prediction.removed_params.get(target.name, 0) if prediction else 0
        removed_m = prediction.removed_macs.get(target.name, 0) if prediction else 0
        self.item(row, PARAMS).setText(self._before_after(target.params, target.params - removed_p))
        self.item(row, MACS).setText(self._before_after(target.macs, target.macs - removed_m))

    @staticmethod
    def _before_after(before: int, after: int) -> str:
        if after == before:
            return fmt.compact(before)
        return f"{fmt.compact(before)} → {fmt.compact(max(after, 0))}"

    @staticmethod
    def _target_tip(target: PlanTarget) -> str:
        layers = ", ".join(target.layers[:8]) + (" …" if len(target.layers) > 8 else "")
        return (
            f"{target.name}\nlayers: {layers}\n{target.size:,} units, "
            f"{target.params:,} parameters, {target.macs:,} MACs"
        )


def show_lock(lock: QCheckBox, locked: bool) -> None:
    """Tick or clear a lock box to match the plan, without the box telling the state back."""
    if lock.isChecked() != locked:
        lock.blockSignals(True)
        lock.setChecked(locked)
        lock.blockSignals(False)
