"""The heatmap widget on its own, and the Sparsity tab on a model with pruned channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.core.models.activations import channel_activation_stats
from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.models.sparsity import channel_norms
from studio.ui.panels.sparsity_panel import (
    ABSOLUTE,
    ACTIVATION,
    APOZ,
    RELATIVE,
    ZEROS,
    SparsityPanel,
)
from studio.ui.runner import JobRunner
from studio.ui.session import Session
from studio.ui.widgets.heatmap import HeatmapView


def test_heatmap_keeps_data_order_apart_from_display_order(qtbot) -> None:
    view = HeatmapView("drop")
    qtbot.addWidget(view)
    values = np.array([[0.1, np.nan], [0.5, 0.7], [0.0, 0.2]])
    view.set_matrix(["a", "b", "c"], ["0.1", "0.2"], values)
    assert view.levels() == (0.0, 0.7)
    assert view.describe(0, 1) == "a @ 0.2: not measured yet"
    view.set_order([1, 2, 0])
    assert view.csv().splitlines() == ["layer,0.1,0.2", "b,0.5,0.7", "c,0.0,0.2", "a,0.1,"]
    view.select_row(0)
    assert view.highlight.isVisible() and view.highlight.rect().top() == 2  # shown last
    with pytest.raises(ValueError, match="permutation"):
        view.set_order([0, 0, 1])
    view.set_matrix(["a", "b", "c"], ["0.1", "0.2"], values * 2)  # same rows: order kept
    assert view.order == [1, 2, 0]
    view.set_matrix(["x"], ["0.1", "0.2"], np.array([[1.0, 2.0]]))  # new rows: model order
    assert view.order == [0] and view.selected == -1


def test_sparsity_tab_shows_zeroed_channels(qtbot, tmp_path) -> None:
    model = load_model("zoo:resnet20")
    conv = dict(model.module.named_modules())["layers.4.conv1"]
    with torch.no_grad():
        conv.weight[:5] = 0  # five dead channels
        conv.weight[5, 0] = 0  # part of one more
    session, runner = Session(), JobRunner()
    panel = SparsityPanel(session, runner)
    qtbot.addWidget(panel)
    panel.show()
    with qtbot.waitSignal(runner.finished, timeout=30_000):
        session.set_model(model)
    expected = channel_norms(model.module)
    names = [c.layer for c in expected]
    row = names.index("layers.4.conv1")
    view = panel.heatmap
    assert view.rows == names
    assert panel.view.currentText() == RELATIVE
    assert np.nanmax(view.values, axis=1) == pytest.approx(np.ones(len(names)))
    np.testing.assert_allclose(view.values[row, :5], 0.0)
    panel.view.setCurrentText(ZEROS)
    np.testing.assert_allclose(view.values[row, :5], 100.0)
    assert 0 < view.values[row, 5] < 100
    assert np.isnan(view.values[names.index("conv1"), 16:]).all()  # 16 channels, padded
    assert "5 all zero" in panel.status.text() and panel.status.text().startswith("resnet20")
    panel.view.setCurrentText(ABSOLUTE)
    width = len(expected[row].norms)
    np.testing.assert_allclose(view.values[row, :width], expected[row].norms, rtol=1e-6)
    assert "channel 7 of" in view.describe(row, 7) and "weak channels" in view.describe(row, 7)

    lines = panel.save_csv(tmp_path / "norms.csv").read_text().splitlines()
    assert lines[0] == (
        "layer,channel,norm,relative_norm,channel_zeros,layer_sparsity,apoz,mean_activation"
    )
    assert len(lines) == 1 + sum(len(c.norms) for c in expected)
    assert panel.save_png(tmp_path / "norms.png").read_bytes()[:4] == b"\x89PNG"
    runner.shutdown(timeout=10)


def test_activation_views_measure_on_the_data(qtbot, tmp_path) -> None:
    model = load_model("demo")
    data = demo_splits()[1].subset(64)
    session, runner = Session(), JobRunner()
    panel = SparsityPanel(session, runner)
    qtbot.addWidget(panel)
    panel.show()
    with qtbot.waitSignal(runner.finished, timeout=30_000):
        session.set_model(model)
    panel.view.setCurrentText(APOZ)
    assert "Open data" in panel.status.text()
    with qtbot.waitSignal(runner.finished, timeout=60_000):
        session.set_data(data)  # the view asks for the measurement once data is in
    expected = channel_activation_stats(model.module, data)
    names = panel.heatmap.rows
    row = names.index("layers.1.conv2")
    apoz, mean = expected["layers.1.conv2"]
    np.testing.assert_allclose(panel.heatmap.values[row, : len(apoz)], apoz * 100, atol=1e-4)
    assert "mean APoZ" in panel.status.text()
    assert "APoZ" in panel.heatmap.describe(row, 3)
    panel.view.setCurrentText(ACTIVATION)
    np.testing.assert_allclose(panel.heatmap.values[row, : len(mean)], mean / mean.max(), rtol=1e-5)
    lines = panel.save_csv(tmp_path / "norms.csv").read_text().splitlines()
    first = next(line for line in lines if line.startswith("layers.1.conv2,0,"))
    assert float(first.split(",")[6]) == pytest.approx(float(apoz[0]))
    runner.shutdown(timeout=10)
