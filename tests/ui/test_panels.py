"""Panels follow the session; the layout persists; numbers are formatted for reading."""

from __future__ import annotations

import re

import pytest

from studio.ui import format as fmt
from studio.ui.main_window import MainWindow
from studio.ui.session import DETAIL, ERROR


def test_log_lines_are_timestamped(window: MainWindow) -> None:
    window.session.log("hello")
    window.session.log("Traceback (most recent call last):\n  File x\nValueError: boom", DETAIL)
    window.session.log("it broke", ERROR)
    lines = window.log_panel.lines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] hello", lines[0])
    assert lines[2].strip() == "File x" and lines[3].strip() == "ValueError: boom"
    assert "it broke" in window.log_panel.view.toPlainText()


def test_empty_window_says_what_to_do(window: MainWindow) -> None:
    assert "Open model" in window.summary.text("model")
    assert window.table.count_label.text() == "No model loaded"
    assert window.progress.isHidden()
    assert not window.recent_menu.isEnabled()
    menus = [a.text() for a in window.menuBar().actions()]
    assert menus[:2] == ["&File", "&View"]


def test_dock_layout_persists(qtbot) -> None:
    first = MainWindow()
    qtbot.addWidget(first)
    first.show()
    first.log_dock.hide()
    width = first.minimumSizeHint().width() + 5  # the offscreen screen is 800x600
    assert width < 800
    first.resize(width, 500)
    first.close()
    second = MainWindow()
    qtbot.addWidget(second)
    second.show()
    assert second.log_dock.isHidden() and not second.summary_dock.isHidden()
    assert second.width() == width
    second.close()


def test_number_formats() -> None:
    assert fmt.thousands(1234567) == "1,234,567"
    assert fmt.count(272474) == "272,474  (272.5 K)"
    assert fmt.compact(40_812_544) == "40.8 M"
    assert fmt.file_size(1_100_000) == "1.0 MiB"
    assert fmt.shape((1, 16, 32, 32)) == "1×16×32×32"
    assert fmt.duration(125) == "2 min 05 s" and fmt.duration(None) == ""


def test_tabs_and_view_menu(qtbot) -> None:
    window = MainWindow(interactive=False)
    qtbot.addWidget(window)
    window.show()
    assert [window.tabs.tabText(i) for i in range(window.tabs.count())] == [
        "Layers",
        "Sensitivity",
        "Sparsity",
        "Planner",
        "Result",
        "Training",
        "Latency",
    ]
    window.show_tab("sparsity")
    assert window.tabs.currentWidget() is window.sparsity
    view = next(a for a in window.menuBar().actions() if a.text() == "&View").menu()
    next(a for a in view.actions() if a.text() == "&Sensitivity").trigger()
    assert window.tabs.currentWidget() is window.sensitivity
    with pytest.raises(ValueError, match="no tab named"):
        window.show_tab("nowhere")
    assert not window.sensitivity.start_button.isEnabled()  # nothing loaded yet
    window.close()
