"""The Planner's table for a transformer: one row per layer with a slider for the attention
head groups it keeps (whole groups: a key/value head with its query heads) and one for the MLP
neurons it keeps, a lock (Allocate leaves a locked layer as it is), the layer's parameters
before -> after and the scan's predicted drop.

The sliders edit the same :class:`PlannerState` as the CNN table (undo steps are whole
gestures: a drag previews and commits once on release).
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from studio.ui import format as fmt
from studio.ui.panels.planner_hf import LayerRow, TransformerCost, drop_text
from studio.ui.panels.planner_state import PlannerState
from studio.ui.panels.planner_table import BAR_ROLE, DropBarDelegate, show_lock

COLUMNS = (
    "Layer", "Attention heads kept", "MLP neurons kept", "Lock", "Parameters", "Predicted drop"
)  # fmt: skip
LAYER, HEADS, MLP, LOCK, PARAMS, DROP = range(len(COLUMNS))


class KeptSlider(QWidget):
    """A horizontal slider of whole units kept, with its value written beside it."""

    def __init__(
        self, low: int, high: int, text: Callable[[int], str], sample: str, parent=None
    ) -> None:  # noqa: ANN001
        super().__init__(parent)
        self.low = low
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, high)  # from none, so the handle sits at the fraction kept
        self.slider.setValue(high)
        self.slider.setPageStep(max(1, high // 8))
        self.slider.setMinimumWidth(120)
        self.label = QLabel()
        self.label.setMinimumWidth(QFontMetrics(self.label.font()).horizontalAdvance(sample) + 8)
        self._text = text
        row = QHBoxLayout(self)
        row.setContentsMargins(6, 0, 6, 0)
        row.addWidget(self.slider, 1)
        row.addWidget(self.label)
        self.slider.valueChanged.connect(self._clamp)
        self.slider.valueChanged.connect(self._show)
        self._show(high)

    def value(self) -> int:
        return self.slider.value()

    def setValue(self, value: int) -> None:  # noqa: N802 - Qt's naming
        self.slider.setValue(value)

    def set_quietly(self, value: int) -> None:
        """Show ``value`` without telling anyone (the state changed, not the user)."""
        self.slider.blockSignals(True)
        self.slider.setValue(value)
        self.slider.blockSignals(False)
        self._show(value)

    def isSliderDown(self) -> bool:  # noqa: N802
        return self.slider.isSliderDown()

    def _show(self, value: int) -> None:
        self.label.setText(self._text(max(value, self.low)))

    def _clamp(self, value: int) -> None:
        """At least ``low`` stays (one head group, one step of neurons)."""
        if value < self.low:
            self.slider.setValue(self.low)  # the slots below hear the clamped value next


class TransformerTable(QTableWidget):
    """Rows follow the state's :class:`TransformerCost` layers; sliders edit ``state``."""

    edited = Signal()  # a slider moved (for tests and the panel)

    def __init__(self, state: PlannerState, parent: QWidget | None = None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.state = state
        self.heads: dict[str, KeptSlider] = {}  # by the layer's attention key
        self.mlps: dict[str, KeptSlider] = {}  # by the layer's MLP key
        self.locks: dict[str, QCheckBox] = {}  # by the layer's name
        self._pressed: dict[str, float] = {}
        self.setHorizontalHeaderLabels(list(COLUMNS))
        self.verticalHeader().setVisible(False)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setItemDelegateForColumn(DROP, DropBarDelegate(self))
        header = self.horizontalHeader()
        header.setSectionResizeMode(LAYER, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(HEADS, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(MLP, QHeaderView.ResizeMode.Stretch)
        for column in (LOCK, PARAMS, DROP):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setMinimumSectionSize(70)
        state.reset.connect(self.rebuild)
        state.changed.connect(self.refresh)

    @property
    def cost(self) -> TransformerCost | None:
        cost = self.state.cost
        return cost if isinstance(cost, TransformerCost) else None

    @property
    def sliders(self) -> list[KeptSlider]:
        return [*self.heads.values(), *self.mlps.values()]

    def rebuild(self) -> None:
        """One row per layer of the state's transformer (none for other models)."""
        self.setRowCount(0)
        self.heads.clear()
        self.mlps.clear()
        self.locks.clear()
        cost = self.cost
        if cost is None:
            return
        self.setRowCount(len(cost.rows))
        for i, row in enumerate(cost.rows):
            item = QTableWidgetItem(row.name)
            item.setToolTip(self._tip(row))
            self.setItem(i, LAYER, item)
            self.setCellWidget(i, HEADS, self._heads_slider(row))
            self.setCellWidget(i, MLP, self._mlp_slider(row))
            self.setCellWidget(i, LOCK, self._lock(row))
            for column in (PARAMS, DROP):
                cell = QTableWidgetItem()
                cell.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(i, column, cell)
            self.setRowHeight(i, max(self.rowHeight(i), 30))
        self.refresh()

    def _heads_slider(self, row: LayerRow) -> KeptSlider:
        u = row.units
        slider = KeptSlider(1, u.groups, row.heads_text, row.heads_text(u.groups))
        slider.setToolTip(
            f"Attention heads {row.name} keeps, in whole groups of {row.heads_per_group} query "
            "head(s) sharing one key/value head (at least one group stays)"
        )
        self._connect(slider, u.attention, row.heads_ratio)
        self.heads[u.attention] = slider
        return slider

    def _mlp_slider(self, row: LayerRow) -> KeptSlider:
        u, step = row.units, row.neuron_step
        steps = -(-u.neurons // step)  # the last step may be short

        def kept(value: int) -> int:
            return min(u.neurons, value * step)

        slider = KeptSlider(1, steps, lambda v: row.mlp_text(kept(v)), row.mlp_text(u.neurons))
        slider.setToolTip(
            f"MLP neurons {row.name} keeps"
            + (f", in steps of {step} (the engine keeps multiples of {step})" if step > 1 else "")
        )
        self._connect(slider, u.mlp, lambda v: row.mlp_ratio(kept(v)))
        self.mlps[u.mlp] = slider
        return slider

    def _lock(self, row: LayerRow) -> QCheckBox:
        lock = QCheckBox()
        lock.setToolTip(f"Allocate leaves {row.name}'s heads and MLP neurons as they are")
        lock.toggled.connect(lambda on, r=row: self._set_locked(r, on))
        self.locks[row.name] = lock
        return lock

    def _set_locked(self, row: LayerRow, locked: bool) -> None:
        """Lock or free the layer's two units together, as one undo step."""
        stack = self.state.undo_stack
        stack.beginMacro(f"{'lock' if locked else 'unlock'} {row.name}")
        for name in (row.units.attention, row.units.mlp):
            self.state.set_locked(name, locked)
        stack.endMacro()

    def _connect(self, slider: KeptSlider, name: str, ratio: Callable[[int], float]) -> None:
        s = slider.slider
        s.sliderPressed.connect(
            lambda n=name: self._pressed.__setitem__(n, self.state.plan.ratio(n))
        )
        s.sliderReleased.connect(lambda n=name, f=ratio, w=slider: self._released(n, f(w.value())))
        s.valueChanged.connect(
            lambda v, n=name, f=ratio, w=slider: self._moved(n, f(max(v, w.low)), w)
        )

    def _moved(self, name: str, ratio: float, slider: KeptSlider) -> None:
        current = self.state.plan.ratio(name)
        if abs(current - ratio) < 1e-9:
            return
        if slider.isSliderDown():
            self.state.preview_ratio(name, ratio)
        else:  # keyboard, wheel or a click on the groove
            self.state.commit_ratio(name, current, ratio)
        self.edited.emit()

    def _released(self, name: str, ratio: float) -> None:
        before = self._pressed.pop(name, self.state.plan.ratio(name))
        self.state.commit_ratio(name, before, ratio)

    def refresh(self) -> None:
        """Show the state's ratios as units kept, the parameters and the predicted drops."""
        cost = self.cost
        if cost is None or not self.heads:
            return
        plan = self.state.plan
        prediction = self.state.predict()
        drops = prediction.target_drops if prediction else {}
        scan = self.state.head_scan()
        per_layer = {
            row.name: sum(drops.get(k, 0.0) for k in (row.units.attention, row.units.mlp))
            for row in cost.rows
        }
        top = max((abs(v) for v in per_layer.values()), default=0.0)
        for i, row in enumerate(cost.rows):
            u = row.units
            heads, mlp = self.heads[u.attention], self.mlps[u.mlp]
            if not heads.isSliderDown():
                heads.set_quietly(row.groups_kept(plan))
            if not mlp.isSliderDown():
                mlp.set_quietly(-(-row.neurons_kept(plan) // row.neuron_step))
            show_lock(self.locks[row.name], u.attention in plan.locked and u.mlp in plan.locked)
            removed = (prediction.removed_params if prediction else {}).get
            after = row.params - removed(u.attention, 0) - removed(u.mlp, 0)
            self.item(i, PARAMS).setText(self._before_after(row.params, after))
            item = self.item(i, DROP)
            if scan is not None and plan.ratio(u.attention) + plan.ratio(u.mlp) > 0:
                value = per_layer[row.name]
                item.setText(drop_text(scan, value))
                item.setData(BAR_ROLE, float(abs(value) / top) if top > 0 else 0.0)
            else:
                item.setText(fmt.DASH)
                item.setData(BAR_ROLE, 0.0)

    @staticmethod
    def _before_after(before: int, after: int) -> str:
        if after == before:
            return fmt.compact(before)
        return f"{fmt.compact(before)} → {fmt.compact(max(after, 0))}"

    @staticmethod
    def _tip(row: LayerRow) -> str:
        u = row.units
        return (
            f"{row.name}\n{u.groups} head group(s) of {row.heads_per_group} query head(s), "
            f"{row.group_params:,} parameters each\n{u.neurons:,} MLP neurons, "
            f"{row.neuron_params:,} parameters each"
        )
