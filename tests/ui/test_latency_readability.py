"""The Latency tab reads well: whole layer names and a value axis in ms or µs on the per-layer
chart, a table of variants that fits the tab at 1280x800, and a Pareto chart whose legend
covers none of its names."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QRectF
from PySide6.QtGui import QImage, QPainter
from PySide6.QtWidgets import QApplication

from studio.core.latency.types import LatencyMeasurement, LayerTime
from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets
from studio.ui.panels.latency_variants import COLUMNS, DEVICE_COLUMNS, HEADER_TIPS, Variant
from studio.ui.widgets.layer_bars import LayerBars, time_unit
from studio.ui.widgets.pareto_chart import ParetoChart

LONG_NAMES = [
    "backbone.stage3.block2.conv1",
    "backbone.stage3.block2.downsample.0",
    "layers.1.conv2",
    "head.classifier.fc",
]


def settle(widget) -> None:  # type: ignore[no-untyped-def]
    """Let layouts and pyqtgraph's deferred resizes run, as a paint would."""
    for _ in range(3):
        QApplication.processEvents()
        widget.grab()


def axis_texts(axis) -> list[tuple[QRectF, str]]:  # type: ignore[no-untyped-def]
    """The tick texts an axis draws, with their rects in the axis' own coordinates."""
    image = QImage(10, 10, QImage.Format.Format_ARGB32)
    painter = QPainter(image)
    if axis.style["tickFont"] is not None:
        painter.setFont(axis.style["tickFont"])
    specs = axis.generateDrawSpecs(painter)
    painter.end()
    return [(rect, text) for rect, _flags, text in specs[2]]


def test_time_unit_follows_the_slowest_layer() -> None:
    assert time_unit(0.07) == (1e3, "µs")
    assert time_unit(0.999) == (1e3, "µs")
    assert time_unit(1.0) == (1.0, "ms")
    assert time_unit(250.0) == (1.0, "ms")


@pytest.mark.parametrize(
    ("ms", "unit", "largest"),
    [(0.07, "µs", 70.0), (0.0009, "µs", 0.9), (2.5, "ms", 2.5), (480.0, "ms", 480.0)],
)
def test_value_axis_is_in_ms_or_us_without_an_si_prefix(
    qtbot, ms: float, unit: str, largest: float
) -> None:
    bars = LayerBars()
    qtbot.addWidget(bars)
    bars.resize(560, 300)
    bars.show()
    layers = [LayerTime(f"layers.{i}.conv1", "Conv", ms * (1 - 0.05 * i)) for i in range(6)]
    bars.show_measured("pruned 1", layers)
    settle(bars)
    axis = bars.getAxis("bottom")
    assert axis.autoSIPrefix is False and axis.autoSIPrefixScale == 1.0
    assert axis.labelText.startswith(f"{unit} per inference") and bars.unit == unit
    assert "(x" not in axis.labelString() and "e-0" not in axis.labelString()
    widths = bars.plotItem.items[0].opts["width"]
    assert max(widths) == pytest.approx(largest)
    low, high = bars.plotItem.vb.viewRange()[0]
    assert low == 0 and largest < high < 1.1 * largest  # the bars fit, with a little room
    # every value under the axis lies inside the widget (none cut off at the right)
    texts = axis_texts(axis)
    assert texts
    for rect, _text in texts:
        scene = axis.mapRectToScene(rect)
        assert 0 <= scene.left() and scene.right() <= bars.viewport().width()


def test_layer_names_are_whole(qtbot) -> None:
    bars = LayerBars()
    qtbot.addWidget(bars)
    bars.resize(560, 260)  # about the chart's size in the Latency tab at 1280x800
    bars.show()
    layers = [LayerTime(name, "Conv", 0.05 - 0.001 * i) for i, name in enumerate(LONG_NAMES)]
    bars.show_measured("a variant with a long name, pruned 1 fine-tuned", layers)
    settle(bars)
    # the plot is no wider than the widget (a long title used to widen it, cutting both sides)
    assert bars.plotItem.sceneBoundingRect().width() <= bars.viewport().width()
    axis = bars.getAxis("left")
    assert axis.sceneBoundingRect().left() >= 0
    drawn = axis_texts(axis)
    assert sorted(text for _rect, text in drawn) == sorted(f"{n} (Conv)" for n in LONG_NAMES)
    for rect, text in drawn:
        assert rect.left() >= 0, f"{text!r} is cut off on the left"
    assert axis.width() >= bars.names_width() > 0
    # the title is cut to the width it has, and whole in the tooltip
    title = bars.plotItem.titleLabel.text
    assert title.endswith("…") and bars.toolTip() == bars.full_title
    assert bars.full_title.startswith("Measured per-layer time of a variant with a long name")
    bars.resize(1400, 400)
    settle(bars)
    assert bars.plotItem.titleLabel.text == bars.full_title and bars.toolTip() == ""


@pytest.mark.parametrize("size", [(370, 220), (600, 420)])
def test_pareto_legend_covers_no_name_and_names_are_inside(qtbot, size: tuple[int, int]) -> None:
    chart = ParetoChart()
    qtbot.addWidget(chart)
    chart.resize(*size)
    chart.show()
    # points in every corner, one where the legend used to be (bottom right)
    names = ["original", "pruned 1", "pruned 1 fine-tuned", "pruned 2", "slow and poor"]
    costs = [1.17, 0.79, 0.80, 0.55, 1.20]
    qualities = [0.9917, 0.7194, 0.97, 0.55, 0.50]
    chart.set_points(names, costs, qualities, "latency (ms, measured)", "quality (%)")
    settle(chart)
    legend = chart.legend.sceneBoundingRect()
    view = chart.plotItem.vb.sceneBoundingRect()
    assert legend.width() > 0 and legend.height() > 0
    assert not legend.intersects(view)  # under the plot, not over it
    assert 0 <= legend.top() and legend.bottom() <= chart.viewport().height()
    assert len(chart.labels) == len(names)
    for label in chart.labels:
        rect = label.sceneBoundingRect()
        assert not rect.intersects(legend), label.toPlainText()
        assert view.adjusted(-1, -1, 1, 1).contains(rect), label.toPlainText()
    for side in ("left", "bottom"):
        assert chart.getAxis(side).autoSIPrefix is False


# ---- the table of variants in the window ------------------------------------------------


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    model = load_model("demo")
    data = demo_splits()[1].subset(64)
    names = prune_targets(model, "structured")
    plan = PruningPlan("structured", ratios={n: 0.5 for n in names}, recalibrate_bn=False)
    return model, prune(model, plan, data)


def measurement(ms: float, key: tuple) -> LatencyMeasurement:
    runtime, batch, threads, device = key
    return LatencyMeasurement(
        ms, 0.9 * ms, 1.3 * ms, batch * 1e3 / ms, 40, runtime, batch, threads, device,
        quiet_ms=0.95 * ms,
    )  # fmt: skip


def test_table_fits_the_tab_at_1280x800(qtbot, window, demo) -> None:  # type: ignore[no-untyped-def]
    model, result = demo
    window.resize(1280, 800)
    window.show_tab("latency")
    panel = window.latency
    key = panel.settings_key()
    params = sum(p.numel() for p in model.module.parameters())
    panel.variants = [
        Variant("original", model, None, params, 40_718_976, 0.9917),
        Variant("pruned 1", result.model, result.plan, result.params_after, 20_610_528, 0.7194),
        Variant(
            "pruned 1 fine-tuned", result.model, result.plan, result.params_after, 20_610_528, 0.97
        ),
    ]
    for v, ms in zip(panel.variants, (1234.567, 801.234, 799.5)):  # wide numbers
        v.measured[key] = measurement(ms, key)
        v.estimated[key] = 0.8 * ms
    panel.target.setCurrentIndex(panel.target.findData("rpi4-cortex-a72"))  # every column
    settle(window)
    table = panel.table
    assert panel.width() < 1000  # the tab beside the summary dock, not the whole window
    assert all(not table.isColumnHidden(c) for c in range(len(COLUMNS)))
    assert table.horizontalScrollBar().maximum() == 0
    assert not table.horizontalScrollBar().isVisible()
    for column in range(1, len(COLUMNS)):  # numbers are never cut short
        assert table.columnWidth(column) >= table.sizeHintForColumn(column)
    assert table.columnWidth(0) >= table.fontMetrics().horizontalAdvance("original")
    # the short headers and the measured spread are spelled out in tooltips
    for column, name in enumerate(COLUMNS[1:], start=1):
        assert table.horizontalHeaderItem(column).toolTip() == HEADER_TIPS[name]
    measured = table.item(1, COLUMNS.index("Measured ms"))
    assert "×" in measured.text() and "10th–90th percentile" in measured.toolTip()
    assert table.item(2, 0).toolTip() == "pruned 1 fine-tuned"
    # the source of the device's figures takes one line, whole in its tooltip
    assert panel.source.height() < 2.5 * panel.source.fontMetrics().height()
    assert panel.source.shown_text().endswith("…") and "raspberrypi.com" in panel.source.toolTip()

    panel.target.setCurrentIndex(0)  # no device: its columns are empty, so hidden
    settle(window)
    assert all(table.isColumnHidden(COLUMNS.index(name)) for name in DEVICE_COLUMNS)
    assert table.horizontalScrollBar().maximum() == 0
