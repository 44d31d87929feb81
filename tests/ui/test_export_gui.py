"""File ▸ Export…, the Netron graphs dialog and the report from the GUI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from studio.core.models.loaded import EAGER, LoadedModel
from studio.ui.dialogs import export_actions, netron_view


def tiny_model() -> LoadedModel:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
    )
    return LoadedModel(module.eval(), "tiny", "tiny", EAGER, (1, 3, 8, 8))


def test_export_dialog_exports_and_shows_the_check(window, qtbot, tmp_path: Path) -> None:
    window.session.set_model(tiny_model())
    dialog = export_actions.open_export_dialog(window)
    qtbot.waitUntil(lambda: not window.runner.is_busy(), timeout=30_000)
    assert dialog.chosen_model() is window.session.model and dialog.chosen_format() == "onnx"
    dialog.path.setText(str(tmp_path / "tiny.onnx"))
    with qtbot.waitSignal(dialog.exported, timeout=60_000):
        dialog.start_export()
    result = dialog.last_result
    assert result.path.is_file() and result.params == result.params_model
    shown = dialog.result_view.toPlainText()
    assert f"{result.params:,} in the file" in shown and "Largest output difference" in shown
    dialog.format_combo.setCurrentIndex(dialog.format_combo.findData("torchscript"))
    assert dialog.path.text().endswith(".pt") and not dialog.int8.isEnabled()
    # the report picks the export up; PDF through Qt
    pdf = export_actions.export_report(window, tmp_path / "report.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    html = export_actions.export_report(window, tmp_path / "report.html").read_text()
    assert "Nothing has been pruned yet" in html and f"{result.ort_ms_exported:.3f}" in html


def test_export_dialog_refuses_the_input_file(window, tmp_path: Path) -> None:
    model = tiny_model()
    source = tmp_path / "tiny.onnx"
    source.write_bytes(b"x")
    model.path = source
    window.session.set_model(model)
    dialog = export_actions.open_export_dialog(window)
    dialog.path.setText(str(source))
    assert dialog.start_export() is None
    assert "opened from" in dialog.message.text()
    assert source.read_bytes() == b"x"


@pytest.mark.skipif(not netron_view.webengine_available(), reason="QtWebEngine not installed")
def test_graphs_dialog_shows_netron_locally_and_stops(window, qtbot) -> None:
    window.session.set_model(tiny_model())
    netron_view.blocked_urls.clear()
    dialog = export_actions.open_graphs(window)
    with qtbot.waitSignal(dialog.ready, timeout=60_000):
        pass
    server = dialog.left.server
    assert server is not None and server.address[0] == "127.0.0.1" and server.running
    assert dialog.left.view is not None
    assert netron_view.blocked_urls == []  # netron asked for nothing outside 127.0.0.1
    # anything else, analytics included, is blocked
    dialog.right.view.load(netron_view.QUrl("https://analytics.google.com/g/collect?v=2"))
    qtbot.waitUntil(lambda: bool(netron_view.blocked_urls), timeout=20_000)
    assert netron_view.blocked_urls[0].startswith("https://analytics.google.com/")
    dialog.close()
    assert not server.running and not dialog.folder.exists()


def test_graphs_fall_back_to_the_browser(window, qtbot, monkeypatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr(netron_view, "_webengine", False)
    monkeypatch.setattr(
        netron_view.QDesktopServices, "openUrl", lambda url: opened.append(url.toString())
    )
    window.session.set_model(tiny_model())
    dialog = export_actions.open_graphs(window)
    with qtbot.waitSignal(dialog.ready, timeout=60_000):
        pass
    assert opened and opened[0].startswith("http://127.0.0.1:")
    assert "web browser" in dialog.message.text()
    dialog.close()
    assert dialog.left.server is None


def test_export_result_shows_the_speed_check_line() -> None:
    from types import SimpleNamespace

    from studio.ui.dialogs.export_dialog import result_html

    line = "not faster: 0.90x the original's speed (1.1 vs 1.0 ms median, ONNX Runtime, batch 1)"
    result = SimpleNamespace(
        path=Path("m.onnx"), format="onnx", opset=17, params=10, params_model=10,
        max_abs_diff=0.0, batch_sizes=(1, 2), bytes=100, ort_ms_exported=1.1,
        ort_ms_original=1.0, speedup=0.9, speed_line=line, notes=[],
    )  # fmt: skip
    shown = result_html(result)
    assert "Speed check" in shown and line in shown and "#c62828" in shown


def test_an_onnx_import_exports_as_onnx_with_its_own_opset(window, qtbot, tmp_path: Path) -> None:
    # the model's own format first, its opset kept; the export runs in a job's process, which
    # unpickles onnx2torch modules (that failed with "No module named 'torchvision'")
    import onnx

    from studio.core.models import corpus
    from studio.core.models.load import load_model

    source = corpus.export("mobilenetv3", tmp_path / "m3.onnx")  # opset 11, Constant nodes
    window.session.set_model(load_model(str(source)))
    dialog = export_actions.open_export_dialog(window)
    qtbot.waitUntil(lambda: not window.runner.is_busy(), timeout=30_000)
    assert dialog.chosen_format() == "onnx" and dialog.opset.value() == 11
    dialog.path.setText(str(tmp_path / "out.onnx"))
    with qtbot.waitSignal(dialog.exported, timeout=60_000):
        dialog.start_export()
    written = onnx.load(str(dialog.last_result.path))
    assert {o.domain: o.version for o in written.opset_import}.get("", 0) == 11
    assert [i.name for i in written.graph.input] == ["x"]
