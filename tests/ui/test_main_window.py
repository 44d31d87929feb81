"""Main window: loading through the runner, the layer table, errors, recent files, trust."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent
from PySide6.QtWidgets import QInputDialog, QMessageBox

from studio.core.models import zoo
from studio.ui.main_window import MainWindow
from studio.ui.panels.layer_table import COLUMNS, GROUP, PARAMS


def test_loads_a_zoo_model_and_fills_the_table(qtbot, window: MainWindow) -> None:
    with qtbot.waitSignal(
        window.session.inventory_changed,
        timeout=60_000,
        check_params_cb=lambda inv: inv is not None,
    ):
        window.open_model("zoo:resnet20")
    inventory = window.session.inventory
    table = window.table
    assert table.model.rowCount() == len(inventory.layers) > 20
    assert table.model.columnCount() == len(COLUMNS)
    assert table.row_layers() == [layer.name for layer in inventory.layers]  # model order
    assert window.summary.text("params").startswith(f"{inventory.params:,}")
    assert "resnet20" in window.windowTitle()
    assert any("Inventory:" in line for line in window.log_panel.lines())

    table.view.sortByColumn(PARAMS, Qt.SortOrder.DescendingOrder)
    params = [
        table.proxy.index(r, PARAMS).data(Qt.ItemDataRole.UserRole)
        for r in range(table.proxy.rowCount())
    ]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    assert table.proxy.index(0, PARAMS).data() == f"{params[0]:,}"  # thousands separators
    table.reset_order()
    assert table.row_layers() == [layer.name for layer in inventory.layers]

    table.filter_edit.setText("bn")
    assert 0 < table.proxy.rowCount() < table.model.rowCount()
    assert all("bn" in name for name in table.row_layers())
    table.filter_edit.clear()

    row = next(i for i, layer in enumerate(inventory.layers) if layer.group is not None)
    tip = table.model.index(row, GROUP).data(Qt.ItemDataRole.ToolTipRole)
    assert inventory.layers[row].name in tip and "Pruned together" in tip
    greyed = next(i for i, layer in enumerate(inventory.layers) if not layer.prunable)
    assert table.model.index(greyed, 0).data(Qt.ItemDataRole.ForegroundRole) is not None
    assert inventory.layers[greyed].reason in table.model.index(greyed, 0).data(
        Qt.ItemDataRole.ToolTipRole
    )


def test_model_and_data_give_accuracy_then_fidelity(
    qtbot, window: MainWindow, wait_idle, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "small.npz", x=x, y=rng.integers(0, 10, 24))
    np.savez(tmp_path / "calib.npz", x=x)
    with qtbot.waitSignal(
        window.session.evaluation_changed, timeout=60_000, check_params_cb=lambda r: r is not None
    ):
        window.open_model("zoo:resnet20")
        window.open_data(str(tmp_path / "small.npz"))
    wait_idle(window)
    result = window.session.evaluation
    assert result.samples == 24 and result.accuracy is not None
    assert "%" in window.summary.text("quality") and "24" in window.summary.text("data")
    assert window.progress.isHidden()  # hidden when idle

    with qtbot.waitSignal(
        window.session.evaluation_changed, timeout=60_000, check_params_cb=lambda r: r is not None
    ):
        window.open_data(str(tmp_path / "calib.npz"))  # unlabeled: fidelity to the original
    wait_idle(window)
    assert window.session.evaluation.agreement == 1.0
    assert "agreement" in window.summary.text("quality")


def test_bad_file_shows_error_and_window_keeps_working(
    qtbot, window: MainWindow, wait_idle, dialogs, tmp_path: Path
) -> None:
    bad = tmp_path / "x.pt"
    bad.write_bytes(os.urandom(4096))
    window.open_model(str(bad))
    qtbot.waitUntil(lambda: bool(dialogs["critical"]), timeout=10_000)
    title, text = dialogs["critical"][0]
    assert "Could not load" in title and "x.pt" in text and "\n" not in text
    assert window.session.model is None
    assert any("x.pt" in line for line in window.log_panel.lines())
    with qtbot.waitSignal(
        window.session.inventory_changed,
        timeout=60_000,
        check_params_cb=lambda inv: inv is not None,
    ):
        window.open_model("zoo:vgg11")
    assert window.table.model.rowCount() == len(window.session.inventory.layers)
    assert len(dialogs["critical"]) == 1


def test_untrusted_pickle_asks_and_does_not_load_when_declined(
    qtbot, window: MainWindow, wait_idle, dialogs, tmp_path: Path
) -> None:
    path = tmp_path / "whole.pt"
    torch.save(zoo.build("vgg11"), path)  # a pickled module: loading it runs code
    window.open_model(str(path))
    qtbot.waitUntil(lambda: bool(dialogs["question"]), timeout=10_000)
    assert "can run code" in dialogs["question"][0][1]
    wait_idle(window)
    assert window.session.model is None and not dialogs["critical"]
    assert window.recent.paths() == []


def test_recent_files_persist_across_windows(qtbot, dialogs, wait_idle, tmp_path: Path) -> None:
    path = tmp_path / "trusted.pt"
    torch.save(zoo.build("vgg11"), path)
    dialogs["answer"][0] = QMessageBox.StandardButton.Yes  # trust it this time
    first = MainWindow()
    qtbot.addWidget(first)
    with qtbot.waitSignal(
        first.session.inventory_changed, timeout=60_000, check_params_cb=lambda inv: inv is not None
    ):
        first.open_model(str(path))
    assert len(dialogs["question"]) == 1
    assert first.session.model.path == path
    assert first.recent.paths() == [str(path.resolve())]
    first.close()

    second = MainWindow()
    qtbot.addWidget(second)
    texts = [a.text() for a in second.recent_menu.actions()]
    assert any("trusted.pt" in t for t in texts) and second.recent_menu.isEnabled()
    second.close()


def test_state_dict_asks_for_the_architecture(
    qtbot,
    window: MainWindow,
    wait_idle,
    dialogs,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = tmp_path / "weights.pth"
    torch.save(zoo.build("vgg11").state_dict(), path)
    asked = []

    def get_item(*args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(args)
        return "vgg11", True

    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(get_item))
    with qtbot.waitSignal(
        window.session.inventory_changed,
        timeout=60_000,
        check_params_cb=lambda inv: inv is not None,
    ):
        window.open_model(str(path))
    assert asked and window.session.model.arch == "vgg11" and not dialogs["critical"]


def test_dropping_a_model_file_opens_it(
    window: MainWindow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    monkeypatch.setattr(window, "open_model", lambda spec, **kw: opened.append(spec))
    mime = QMimeData()
    for name, expected in (("net.onnx", True), ("notes.txt", False)):
        mime.setUrls([QUrl.fromLocalFile(str(tmp_path / name))])
        event = QDropEvent(
            QPointF(10, 10),
            Qt.DropAction.CopyAction,
            mime,
            Qt.MouseButton.NoButton,
            Qt.KeyboardModifier.NoModifier,
        )
        window.dropEvent(event)
        assert (str(tmp_path / name) in opened) is expected


def test_closing_cancels_running_jobs(qtbot) -> None:
    import threading

    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    started = threading.Event()

    def forever(progress, cancel):  # type: ignore[no-untyped-def]
        while True:
            started.set()
            progress(0.5, "spinning")
            cancel.check()
            threading.Event().wait(0.01)

    job = win.runner.start("Spinning", forever)
    assert started.wait(5)
    qtbot.waitUntil(win.progress.isVisible, timeout=2000)
    assert "Spinning" in win.progress.label.text()
    win.close()
    assert job.token.cancelled and win.runner.thread_count() == 0


@pytest.mark.parametrize("data_first", [True, False])
def test_a_model_with_dynamic_inputs_takes_its_shape_from_the_data(
    qtbot, window: MainWindow, wait_idle, dialogs, tmp_path: Path, data_first: bool
) -> None:
    from studio.core.models import corpus

    corpus.export("unet", tmp_path / "unet.onnx")  # dynamic batch, height and width
    np.savez(tmp_path / "x.npz", x=corpus.synthetic_input("unet", 8, seed=0).numpy()[:, :, :48])
    opened = [lambda: window.open_data(str(tmp_path / "x.npz"))]
    opened.append(lambda: window.open_model(str(tmp_path / "unet.onnx")))
    with qtbot.waitSignal(window.session.inventory_changed, timeout=60_000):
        for step in opened if data_first else reversed(opened):
            step()
            if data_first:
                wait_idle(window)
    wait_idle(window)
    assert not dialogs["critical"] and window.session.model is not None
    assert window.session.model.input_shape == (1, 3, 48, 64)
    assert any("from the data" in line for line in window.log_panel.lines())
