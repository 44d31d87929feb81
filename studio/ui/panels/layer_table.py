"""The layer table: one row per layer of the model's inventory, sortable and filterable."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QGuiApplication, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from studio.ui import format as fmt

if TYPE_CHECKING:
    from studio.core.models.inventory import Inventory, LayerInfo
    from studio.ui.session import Session

Index = QModelIndex | QPersistentModelIndex
COLUMNS = (
    "Layer",
    "Type",
    "Output shape",
    "Params",
    "MACs",
    "Sparsity %",
    "Prunable",
    "Group",
    "Reason",
)
LAYER, TYPE, SHAPE, PARAMS, MACS, SPARSITY, PRUNABLE, GROUP, REASON = range(len(COLUMNS))
NUMERIC = {SHAPE, PARAMS, MACS, SPARSITY}
HEADER_TIPS = {
    SHAPE: "Output shape for one input (batch of 1)",
    MACS: "Multiply-accumulate operations for one input",
    SPARSITY: "Share of the layer's weights that are exactly zero",
    PRUNABLE: "Whether the layer's output channels can be removed structurally",
    GROUP: "Dependency group: layers whose channels must be pruned together",
    REASON: "Why a layer cannot be pruned",
}


def group_members(inventory: Inventory, gid: int) -> tuple[str, ...]:
    group = inventory.groups[gid]
    return tuple(getattr(group, "members", group))


class LayerTableModel(QAbstractTableModel):
    """Read-only table over ``Inventory.layers`` in model order."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._inventory: Inventory | None = None
        self._layers: list[LayerInfo] = []

    def set_inventory(self, inventory: Inventory | None) -> None:
        self.beginResetModel()
        self._inventory = inventory
        self._layers = list(inventory.layers) if inventory is not None else []
        self.endResetModel()

    def layer(self, row: int) -> LayerInfo:
        return self._layers[row]

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 - Qt signature
        return 0 if parent.isValid() else len(self._layers)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 - Qt signature
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = 0) -> Any:
        if orientation == Qt.Orientation.Horizontal:
            if role == Qt.ItemDataRole.DisplayRole:
                return COLUMNS[section]
            if role == Qt.ItemDataRole.ToolTipRole:
                return HEADER_TIPS.get(section)
        elif role == Qt.ItemDataRole.DisplayRole:
            return str(section + 1)
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        layer, col = self._layers[index.row()], index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(layer, col)
        if role == Qt.ItemDataRole.TextAlignmentRole:
            horizontal = (
                Qt.AlignmentFlag.AlignRight if col in NUMERIC else Qt.AlignmentFlag.AlignLeft
            )
            return int(horizontal | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and not layer.prunable:
            return QGuiApplication.palette().color(
                QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text
            )
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(layer, col)
        if role == Qt.ItemDataRole.UserRole:
            return self.sort_key(index.row(), col)
        return None

    def sort_key(self, row: int, col: int) -> Any:
        """A plain Python value that orders rows by column ``col``."""
        layer = self._layers[row]
        if col == SHAPE:
            return math.prod(layer.output_shape) if layer.output_shape is not None else -1
        if col == GROUP:
            return layer.group if layer.group is not None else math.inf
        return {
            LAYER: layer.name,
            TYPE: layer.type,
            PARAMS: layer.params,
            MACS: layer.macs,
            SPARSITY: layer.sparsity,
            PRUNABLE: layer.prunable,
            REASON: layer.reason,
        }[col]

    def _text(self, layer: LayerInfo, col: int) -> str:
        if col == LAYER:
            return layer.name
        if col == TYPE:
            return layer.type
        if col == SHAPE:
            return fmt.shape(layer.output_shape)
        if col == PARAMS:
            return fmt.thousands(layer.params)
        if col == MACS:
            return fmt.thousands(layer.macs)
        if col == SPARSITY:
            return f"{layer.sparsity * 100:.1f}"
        if col == PRUNABLE:
            return "yes" if layer.prunable else "no"
        if col == GROUP:
            if layer.group is None or self._inventory is None:
                return ""
            size = len(group_members(self._inventory, layer.group))
            return f"G{layer.group} · {size} layer{'s' if size != 1 else ''}"
        return layer.reason

    def _tooltip(self, layer: LayerInfo, col: int) -> str | None:
        if col == GROUP and layer.group is not None and self._inventory is not None:
            group = self._inventory.groups[layer.group]
            members = group_members(self._inventory, layer.group)
            head = f"Group G{layer.group}"
            if getattr(group, "root", None):
                head += f": {group.channels} channels of {group.root}"
            lines = [f"{'▸' if m == layer.name else '•'} {m}" for m in members]
            return head + "\nPruned together:\n" + "\n".join(lines)
        if not layer.prunable and layer.reason:
            return f"{layer.name}: not prunable — {layer.reason}"
        if col == LAYER:
            return layer.name
        return None


class LayerFilterProxy(QSortFilterProxyModel):
    """Sorts on plain Python keys and filters on name, type and reason."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._text = ""
        self._prunable_only = False

    def set_filter(self, text: str, prunable_only: bool) -> None:
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.9; invalidateFilter is deprecated
            self.beginFilterChange()
            self._text, self._prunable_only = text.strip().lower(), prunable_only
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self._text, self._prunable_only = text.strip().lower(), prunable_only
            self.invalidateFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:
        layer = self.sourceModel().layer(source_row)  # type: ignore[attr-defined]
        if self._prunable_only and not layer.prunable:
            return False
        if not self._text:
            return True
        return any(self._text in s.lower() for s in (layer.name, layer.type, layer.reason))

    def lessThan(self, left: Index, right: Index) -> bool:
        model = self.sourceModel()
        a = model.sort_key(left.row(), left.column())  # type: ignore[attr-defined]
        b = model.sort_key(right.row(), right.column())  # type: ignore[attr-defined]
        return (a, left.row()) < (b, right.row())


class LayerTablePanel(QWidget):
    """Central panel: filter box, layer count and the table; follows ``session.inventory``."""

    def __init__(self, session: Session, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.session = session
        self.model = LayerTableModel(self)
        self.proxy = LayerFilterProxy(self)
        self.proxy.setSourceModel(self.model)

        self.filter_edit = QLineEdit(placeholderText="Filter layers by name, type or reason…")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self._on_filter)
        self.prunable_only = QCheckBox("Prunable only")
        self.prunable_only.toggled.connect(self._on_filter)
        self.order_button = QPushButton("Model order")
        self.order_button.setToolTip("Show the layers in the order the model defines them")
        self.order_button.clicked.connect(self.reset_order)
        self.count_label = QLabel()

        self.view = QTableView()
        self.view.setModel(self.proxy)
        self.view.setAlternatingRowColors(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.setWordWrap(False)
        self.view.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        header = self.view.horizontalHeader()
        header.setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        header.setSectionsMovable(True)
        header.setStretchLastSection(True)
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.view.setSortingEnabled(True)
        self.proxy.sort(-1)
        rows = self.view.verticalHeader()
        rows.setDefaultSectionSize(self.fontMetrics().height() + 8)
        rows.setDefaultAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

        bar = QHBoxLayout()
        bar.addWidget(self.filter_edit, 1)
        bar.addWidget(self.prunable_only)
        bar.addWidget(self.order_button)
        bar.addWidget(self.count_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(bar)
        layout.addWidget(self.view)

        session.inventory_changed.connect(self.set_inventory)
        self.set_inventory(session.inventory)

    def set_inventory(self, inventory: Inventory | None) -> None:
        self.model.set_inventory(inventory)
        if inventory is not None:
            self.view.resizeColumnsToContents()
            for col, cap in ((LAYER, 300), (TYPE, 150), (GROUP, 150)):
                self.view.setColumnWidth(col, min(self.view.columnWidth(col), cap))
        self._update_count()

    def reset_order(self) -> None:
        """Back to the order in which the model defines its layers."""
        self.view.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.proxy.sort(-1)

    def row_layers(self) -> list[str]:
        """Layer names in the order the table shows them (after sorting and filtering)."""
        return [
            self.model.layer(self.proxy.mapToSource(self.proxy.index(r, 0)).row()).name
            for r in range(self.proxy.rowCount())
        ]

    def _on_filter(self, *_args: object) -> None:
        self.proxy.set_filter(self.filter_edit.text(), self.prunable_only.isChecked())
        self._update_count()

    def _update_count(self) -> None:
        total, shown = self.model.rowCount(), self.proxy.rowCount()
        prunable = sum(1 for r in range(total) if self.model.layer(r).prunable)
        if total == 0:
            self.count_label.setText("No model loaded")
        elif shown == total:
            self.count_label.setText(f"{total} layers, {prunable} prunable")
        else:
            self.count_label.setText(f"{shown} of {total} layers shown")
