"""Transformers from Hugging Face folders in the window: opening a folder, text data with
the model's tokenizer, wrong pairings as errors, and the Sensitivity tab's head/MLP/layer
scan (heatmap values, the MLP view, hover text, saving)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent

from studio.core.models import hf_zoo
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.core.models.loaded import HUGGINGFACE
from studio.core.models.text import load_text_data
from studio.core.scan.heads import HeadScan
from studio.ui.main_window import MainWindow
from studio.ui.panels import head_scan_text
from studio.ui.panels.sensitivity_panel import SensitivityPanel
from studio.ui.runner import JobRunner
from studio.ui.session import Session
from studio.ui.workflow import ModelRequest

SEQ_LEN = 32
LAYERS = 2
JOBS_TIMEOUT_MS = 300_000  # a transformer's jobs each start a process that imports transformers


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-style folder: 8 query heads in 2 key/value groups."""
    return hf_zoo.write_folder("llama", tmp_path_factory.mktemp("hf") / "llama", layers=LAYERS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(hf_zoo.corpus_text()[:8_000])
    return path


@pytest.fixture
def wait_idle(qtbot):  # type: ignore[no-untyped-def]
    """``wait_idle(window)``: all the window's jobs ended (a longer wait than conftest's)."""

    def wait(win: MainWindow) -> None:
        qtbot.waitUntil(lambda: not win.runner.is_busy(), timeout=JOBS_TIMEOUT_MS)

    return wait


def open_llama(window: MainWindow, llama: Path) -> None:
    window.open_model(ModelRequest(str(llama), input_shape=(1, SEQ_LEN)))


def test_a_folder_opens_with_its_text_data_and_shows_perplexity(
    qtbot, window: MainWindow, wait_idle, dialogs, llama: Path, corpus: Path
) -> None:
    open_llama(window, llama)
    window.open_data(str(corpus))  # before the model is in: waits for its tokenizer
    wait_idle(window)
    s = window.session
    assert not dialogs["critical"] and not window.errors
    assert s.model.kind == HUGGINGFACE and s.model.task == "causal-lm"
    splits = load_text_data(corpus, s.model.tokenizer, SEQ_LEN)
    assert s.is_text_data and s.data_spec == str(corpus)
    assert s.data.x.shape == splits.validation.x.shape and s.data.x.shape[1] == SEQ_LEN
    assert s.calibration is not None and len(s.calibration) == len(splits.calibration)
    assert s.evaluation is not None and s.evaluation.perplexity > 1.0
    assert window.summary.labels["quality"].text() == "Perplexity:"
    assert window.summary.text("quality").startswith(f"{s.evaluation.perplexity:.3f}")
    assert any("] Perplexity" in line for line in window.log_panel.lines())
    assert window.recent.paths() == [str(llama.resolve())]  # a folder is a recent model
    # the Sensitivity tab shows the transformer view, ready to scan
    panel = window.sensitivity
    assert panel.stack.currentWidget() is panel.transformer
    assert panel.transformer.start_button.isEnabled()


def test_wrong_pairings_are_one_line_errors_and_the_window_goes_on(
    qtbot, window: MainWindow, wait_idle, dialogs, llama: Path, corpus: Path
) -> None:
    open_llama(window, llama)
    wait_idle(window)
    window.open_data("demo")  # images for a language model
    qtbot.waitUntil(lambda: len(dialogs["critical"]) == 1, timeout=5000)
    title, message = dialogs["critical"][0]
    assert "language model" in message and "\n" not in message
    assert window.session.data is None and not window.runner.is_busy()

    window.open_model("demo")  # text data waits for a model; a CNN cannot take it
    window.open_data(str(corpus))
    wait_idle(window)
    qtbot.waitUntil(lambda: len(dialogs["critical"]) == 2, timeout=5000)
    assert "is text" in dialogs["critical"][1][1] and window.session.data is None
    assert any("Could not use the data" in line for line in window.log_panel.lines())
    window.open_data("demo")  # the window keeps working
    wait_idle(window)
    assert window.session.evaluation is not None and window.session.evaluation.accuracy > 0.5
    assert window.sensitivity.stack.currentWidget() is window.sensitivity.cnn_view


def test_dropping_a_model_folder_opens_it(
    window: MainWindow, llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    monkeypatch.setattr(window, "open_model", lambda spec, **kw: opened.append(spec))
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(llama))])
    event = QDropEvent(
        QPointF(10, 10),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
    )
    window.dropEvent(event)
    assert opened == [str(llama)]


@pytest.fixture
def panel(qtbot, llama: Path, corpus: Path):  # type: ignore[no-untyped-def]
    model = load_model(str(llama), input_shape=(1, SEQ_LEN))
    splits = load_text_data(corpus, model.tokenizer, SEQ_LEN)
    session, runner = Session(), JobRunner()
    widget = SensitivityPanel(session, runner)
    qtbot.addWidget(widget)
    widget.resize(1100, 600)
    widget.show()
    session.set_model(model)
    session.set_inventory(build_inventory(model.replica()))
    session.set_data(splits.validation, splits.calibration, str(corpus))
    yield widget
    runner.shutdown(timeout=30)


def test_the_head_scan_fills_the_heatmap_layer_by_layer(
    qtbot, panel: SensitivityPanel, tmp_path: Path
) -> None:
    view = panel.transformer
    assert panel.stack.currentWidget() is view and view.start_button.isEnabled()
    view.use_cache.setChecked(False)
    partial: list[int] = []
    panel.runner.partial.connect(
        lambda job, item: partial.append(head_scan_text.measured_layers(item))
    )
    with qtbot.waitSignal(panel.runner.finished, timeout=JOBS_TIMEOUT_MS):
        assert panel.start() is view.job is not None  # the panel starts the transformer scan
        assert view.heatmap.rows == [f"model.layers.{i}" for i in range(LAYERS)]  # grid at once
    qtbot.waitUntil(lambda: not view.running, timeout=5000)
    scan = view.scan
    assert isinstance(scan, HeadScan) and panel.session.head_scan is scan
    assert partial == list(range(1, LAYERS + 1))  # one item as each layer finished
    assert scan.metric == "perplexity" and scan.groups == [2] * LAYERS
    # Heads: layers x head groups, the values HeadScan shows
    assert view.heatmap.rows == scan.layers
    assert view.heatmap.columns == ["kv0 (q0-3)", "kv1 (q4-7)"]
    np.testing.assert_allclose(view.heatmap.values, scan.shown(scan.head_drop))
    assert np.isfinite(view.heatmap.values).all()
    shown = scan.shown(scan.head_drop)
    assert view.log_scale.isChecked()  # colours by order of magnitude, values exact
    width = head_scan_text.log_width(scan)
    expected = np.sign(shown) * np.log10(1 + np.abs(shown) / width)
    np.testing.assert_allclose(view.heatmap.image.image, expected)
    view.log_scale.setChecked(False)
    np.testing.assert_allclose(view.heatmap.image.image, shown)
    assert view.heatmap.bar.getAxis("left").labelText == "perplexity increase"
    np.testing.assert_allclose(view.heatmap.side_values, scan.shown(scan.layer_drop))
    tip = view.heatmap.describe(1, 1)
    value = scan.shown(scan.head_drop)[1, 1]
    assert "model.layers.1" in tip and "query heads 4-7" in tip and f"{value:+.6g}" in tip
    assert "whole layer skipped" in view.heatmap.describe_side(0)
    assert view.status.text().startswith("Done: 2 layers x 2 head groups")
    # MLP: layers x ratios
    view.view.setCurrentText(head_scan_text.MLP)
    assert view.heatmap.columns == [f"{r * 100:g}%" for r in scan.mlp_ratios]
    assert view.heatmap.values.shape == (LAYERS, len(scan.mlp_ratios))
    np.testing.assert_allclose(view.heatmap.image.image, scan.shown(scan.mlp_drop))
    np.testing.assert_allclose(view.heatmap.values, scan.shown(scan.mlp_drop))
    assert "12.5% of the MLP neurons off" in view.heatmap.describe(0, 0)
    # saving: the scan's rows as CSV, the heatmap as PNG
    assert view.save_csv_button.isEnabled()
    rows = view.save_csv(tmp_path / "heads.csv").read_text().splitlines()
    assert rows == scan.to_csv().splitlines()
    assert rows[0] == "layer,unit,index,perplexity increase"
    assert len(rows) == 1 + LAYERS * (2 + len(scan.mlp_ratios) + 1)
    png = view.save_png(tmp_path / "heads.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cancel_stops_the_head_scan(qtbot, panel: SensitivityPanel) -> None:
    view = panel.transformer
    view.use_cache.setChecked(False)
    with qtbot.waitSignal(panel.runner.cancelled, timeout=JOBS_TIMEOUT_MS):
        view.start()
        qtbot.waitUntil(lambda: view.job.fraction > 0.0, timeout=JOBS_TIMEOUT_MS)
        view.cancel()
    assert not view.running and view.status.text().startswith("Cancelled after")
    assert view.start_button.isEnabled() and panel.session.head_scan is None


def test_a_scan_from_another_tab_shows_with_absent_groups_grey(qtbot) -> None:
    """A HeadScan set on the session (the Planner runs one too) is drawn; a layer with fewer
    head groups (a pruned model) has NaN cells that say so."""
    from studio.ui.panels.head_scan_view import HeadScanView

    session, runner = Session(), JobRunner()
    view = HeadScanView(session, runner)
    qtbot.addWidget(view)
    heads = np.array([[0.1, 0.4, 0.2, 0.0], [0.3, -0.01, 0.5, 0.2], [0.05, 0.6, np.nan, np.nan]])
    scan = HeadScan(
        layers=["h.0", "h.1", "h.2"],
        groups=[4, 4, 2],
        heads_per_group=[2, 2, 2],
        metric="perplexity",
        baseline=2.0,
        head_drop=heads,
        mlp_ratios=(0.25, 0.5),
        mlp_drop=np.array([[0.0, 0.1], [0.2, 0.3], [0.1, 0.9]]),
        layer_drop=np.array([0.5, 1.0, 2.0]),
        samples=8,
    )
    session.set_head_scan(scan)
    assert view.scan is scan and view.save_csv_button.isEnabled()
    shown = scan.shown(heads)
    np.testing.assert_allclose(view.heatmap.values, shown)  # NaN where a layer has no group
    assert view.heatmap.columns == ["kv0 (q0-1)", "kv1 (q2-3)", "kv2 (q4-5)", "kv3 (q6-7)"]
    assert view.heatmap.levels() == (0.0, pytest.approx(np.nanmax(shown)))  # 0 = pale
    assert view.heatmap.describe(2, 3) == "h.2: has 2 head groups, no group 3"
    assert "perplexity 7.3891 → " in view.heatmap.describe(0, 1)
    runner.shutdown(timeout=5)
