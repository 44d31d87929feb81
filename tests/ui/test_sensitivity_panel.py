"""The Sensitivity tab: a live scan, cancel and resume, hover, click, sort, save."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt

from studio.core.errors import StudioError
from studio.core.models.data import DataSet, demo_splits
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.ui.panels.sensitivity_panel import SensitivityPanel
from studio.ui.runner import JobRunner
from studio.ui.session import Session
from studio.ui.widgets.scan_controls import parse_ratios

SAMPLES = 96


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    model = load_model("demo")
    return model, build_inventory(model), demo_splits()[1].subset(SAMPLES)


@pytest.fixture
def panel(qtbot, demo):  # type: ignore[no-untyped-def]
    model, inventory, data = demo
    session, runner = Session(), JobRunner()
    widget = SensitivityPanel(session, runner)
    qtbot.addWidget(widget)
    widget.resize(1000, 600)
    widget.show()
    session.set_model(model)
    session.set_inventory(inventory)
    session.set_data(data)
    yield widget
    runner.shutdown(timeout=30)


def run_scan(qtbot, panel: SensitivityPanel, ratios: str, method: str = "exact") -> None:
    panel.controls.ratios.setText(ratios)
    panel.controls.method.setCurrentText(method)
    with qtbot.waitSignal(panel.runner.finished, timeout=120_000):
        assert panel.start() is not None
    qtbot.waitUntil(lambda: not panel.running, timeout=5000)


def test_scan_fills_the_heatmap_live(qtbot, panel: SensitivityPanel) -> None:
    panel.controls.use_cache.setChecked(False)
    seen: list[int] = []
    panel.runner.partial.connect(
        lambda job, item: seen.append(len(panel.report.rows) if panel.report else 0)
    )
    assert panel.start_button.isEnabled() and panel.controls.metric_key == "accuracy"
    run_scan(qtbot, panel, "0.3,0.6")
    report = panel.report
    cells = len(report.targets) * 2
    assert len(report.rows) == cells and report.cached_rows == 0
    assert seen == list(range(0, cells + 1))  # the prepared report, then one row at a time
    names, ratios, grid = report.matrix("accuracy")
    assert panel.heatmap.rows == names and panel.heatmap.columns == ["0.3", "0.6"]
    np.testing.assert_allclose(panel.heatmap.values, grid * 100.0)
    # the residual group of the second stage is one row with a real drop
    shortcut = names.index("layers.3.shortcut.0")
    assert grid[shortcut, 1] > 0.05
    assert panel.status.text().startswith(f"Done: {cells} cells, {cells} measured")
    # the most sensitive row is selected and its curve drawn
    worst = int(np.argmax(np.nanmean(grid, axis=1)))
    assert panel.heatmap.selected == worst
    x, y = panel.curve.getData()
    np.testing.assert_allclose(x, [0.3, 0.6])
    np.testing.assert_allclose(y, grid[worst] * 100.0)
    assert panel.curve_plot.plotItem.titleLabel.text == names[worst]


def test_cancel_then_resume_measures_only_the_rest(
    qtbot, panel: SensitivityPanel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path))
    panel.controls.ratios.setText("0.2,0.4,0.6")
    job = panel.start()
    qtbot.waitUntil(
        lambda: panel.report is not None and len(panel.report.rows) >= 3, timeout=60_000
    )
    with qtbot.waitSignal(panel.runner.cancelled, timeout=30_000):
        panel.cancel_button.click()
    assert job.state == "cancelled"
    shown = len(panel.report.rows)
    total = len(panel.report.targets) * 3
    assert shown < total
    assert panel.start_button.text() == "Resume scan" and panel.start_button.isEnabled()
    assert f"after {shown} of {total} cells" in panel.status.text()
    with qtbot.waitSignal(panel.runner.finished, timeout=120_000):
        panel.start_button.click()
    report = panel.report
    assert len(report.rows) == total
    assert shown <= report.cached_rows < total  # rows measured before were not measured again
    assert len({(r.layer, r.ratio) for r in report.rows}) == total
    assert panel.start_button.text() == "Start scan"


def test_hover_click_sort_and_save(qtbot, panel: SensitivityPanel, tmp_path: Path) -> None:
    run_scan(qtbot, panel, "0.5")
    view = panel.heatmap
    names, _, grid = panel.report.matrix("accuracy")

    def scene_point(display_row: int) -> QPointF:
        return view.plot.vb.mapViewToScene(QPointF(0.5, display_row + 0.5))

    view.canvas.scene().sigMouseMoved.emit(scene_point(2))
    caption = view.caption.text()
    assert caption.startswith(f"{names[2]} pruned by 0.5")
    assert "baseline" in caption and "parameters" in caption
    pos = view.canvas.mapFromScene(scene_point(4))
    with qtbot.waitSignal(view.row_clicked, timeout=2000) as clicked:
        qtbot.mouseClick(view.canvas.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert clicked.args == [4] and view.selected == 4
    assert panel.curve_plot.plotItem.titleLabel.text == names[4]

    panel.sort.setCurrentIndex(1)  # most sensitive first
    shown = grid[view.order, 0]
    assert list(shown) == sorted(shown, reverse=True)
    view.canvas.scene().sigMouseMoved.emit(scene_point(0))
    assert view.caption.text().startswith(names[int(np.argmax(grid[:, 0]))])

    png = panel.save_png(tmp_path / "heatmap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = panel.save_csv(tmp_path / "scan.csv").read_text().splitlines()
    assert csv[0].startswith("layer,ratio,metric,value,baseline")
    assert len(csv) == 1 + len(names)
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(b"original")
    panel.session._model = dataclasses.replace(panel.session.model, path=model_file)
    with pytest.raises(StudioError, match="input file"):
        panel.save_csv(model_file)
    assert model_file.read_bytes() == b"original"


def test_metric_switch_redraws_without_rescanning(qtbot, panel: SensitivityPanel) -> None:
    run_scan(qtbot, panel, "0.5")
    job = panel.job
    panel.controls.metric.setCurrentIndex(panel.controls.metric.findData("loss"))
    assert panel.job is job
    _, _, loss = panel.report.matrix("loss")
    np.testing.assert_allclose(panel.heatmap.values, loss)
    assert panel.heatmap.bar.getAxis("left").labelText == "loss increase"


def test_taylor_shows_loss_only(qtbot, panel: SensitivityPanel) -> None:
    controls = panel.controls
    controls.method.setCurrentText("taylor")
    metric_items = controls.metric.model()
    assert controls.metric_key == "loss"
    assert not metric_items.item(controls.metric.findData("accuracy")).isEnabled()
    run_scan(qtbot, panel, "0.5", method="taylor")
    assert all(row.estimate for row in panel.report.rows)
    view = panel.heatmap
    view.canvas.scene().sigMouseMoved.emit(view.plot.vb.mapViewToScene(QPointF(0.5, 0.5)))
    assert "estimated loss" in view.caption.text()
    controls.method.setCurrentText("exact")  # the taylor scan on show still allows loss only
    assert controls.metric_key == "loss"


def test_bad_settings_and_unlabeled_data(qtbot, panel: SensitivityPanel, demo) -> None:
    panel.controls.ratios.setText("0.5, half")
    with qtbot.waitSignal(panel.error, timeout=2000) as error:
        assert panel.start() is None
    assert "ratios must be numbers" in error.args[1]
    panel.controls.ratios.setText("0.5,1.5")
    with qtbot.waitSignal(panel.error, timeout=2000) as error:
        assert panel.start() is None
    assert "between 0 and 1" in error.args[1]
    _, _, data = demo
    panel.session.set_data(DataSet(data.x, None, "unlabeled"))
    items = panel.controls.metric.model()
    assert not items.item(panel.controls.metric.findData("accuracy")).isEnabled()
    assert panel.controls.metric_key == "loss"


def test_parse_ratios() -> None:
    assert parse_ratios(" 0.5, 0.1;0.5 ") == (0.1, 0.5)
    with pytest.raises(StudioError, match="at least one"):
        parse_ratios(" , ")
    assert math.isclose(parse_ratios("0.25")[0], 0.25)
