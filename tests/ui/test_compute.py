"""Settings ▸ Compute: the choice, its connection check, and a scan that runs on Ray."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QSettings

from studio.core.cluster.connection import Cluster, Compute
from studio.core.models.data import demo_splits
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.ui.dialogs import compute_dialog
from studio.ui.dialogs.compute_dialog import ComputeDialog, load_compute
from studio.ui.panels.sensitivity_panel import SensitivityPanel
from studio.ui.runner import JobRunner
from studio.ui.session import Session


@pytest.fixture
def parts(qtbot, tmp_path):  # type: ignore[no-untyped-def]
    settings = QSettings(str(tmp_path / "studio.ini"), QSettings.Format.IniFormat)
    session, runner = Session(), JobRunner()
    yield session, runner, settings
    runner.shutdown(timeout=30)


def _dialog(qtbot, parts) -> ComputeDialog:  # type: ignore[no-untyped-def]
    dialog = ComputeDialog(*parts)
    qtbot.addWidget(dialog)
    return dialog


def test_without_ray_the_dialog_names_the_install_command(qtbot, parts, monkeypatch) -> None:
    session, runner, settings = parts
    monkeypatch.setattr(compute_dialog, "ray_available", lambda: False)
    dialog = _dialog(qtbot, parts)
    assert not dialog.ray.isEnabled() and dialog.here.isChecked()
    assert "packaging/install.sh --ray" in dialog.status.text()
    assert not dialog.address.isEnabled() and not dialog.check.isEnabled()
    dialog.accept()
    assert session.compute == Compute()


def test_a_bad_address_stays_in_the_dialog(qtbot, parts) -> None:
    pytest.importorskip("ray")
    session, runner, settings = parts
    dialog = _dialog(qtbot, parts)
    dialog.ray.setChecked(True)
    dialog.address.setCurrentText("head-without-port")
    dialog.accept()
    assert "is not a Ray address" in dialog.status.text()
    assert session.compute == Compute()  # unchanged
    dialog.address.setCurrentText("127.0.0.1:9")  # nothing listens there
    with qtbot.waitSignal(runner.failed, timeout=30_000):
        assert dialog.check_connection() is not None
    assert "could not connect to Ray at 127.0.0.1:9" in dialog.status.text()
    assert dialog.nodes.rowCount() == 0 and dialog.check.isEnabled()


def test_choice_is_kept_and_shown(qtbot, parts) -> None:
    pytest.importorskip("ray")
    session, runner, settings = parts
    dialog = _dialog(qtbot, parts)
    assert dialog.here.isChecked() and not dialog.workers.isEnabled()
    dialog.ray.setChecked(True)
    assert dialog.workers.isEnabled()
    dialog.address.setCurrentText("ray://head.example:10001")
    dialog.workers.setValue(16)
    dialog.accept()
    assert session.compute == Compute("ray://head.example:10001", 16)
    assert load_compute(settings) == Compute("ray://head.example:10001", 16)
    assert "Ray: ray://head.example:10001, 16 workers" == session.compute.describe()


def test_check_lists_nodes_and_a_scan_runs_there(qtbot, parts) -> None:
    pytest.importorskip("ray")
    session, runner, settings = parts
    dialog = _dialog(qtbot, parts)
    dialog.ray.setChecked(True)
    dialog.address.setCurrentText("local")
    dialog.workers.setValue(2)
    try:
        with qtbot.waitSignal(runner.finished, timeout=120_000):
            assert dialog.check_connection() is not None
        assert dialog.status.text().count("Connected: local Ray at 127.0.0.1:")
        assert dialog.nodes.rowCount() == 1
        assert dialog.nodes.item(0, 0).text() == "127.0.0.1"
        assert float(dialog.nodes.item(0, 1).text()) >= 1
        assert dialog.nodes.item(0, 3).text() == "alive, head"
        dialog.accept()
        assert session.compute == Compute("local", 2)

        # the Sensitivity tab now scans on Ray and says so
        panel = SensitivityPanel(session, runner)
        qtbot.addWidget(panel)
        assert panel.where.text() == "Runs on Ray: local, 2 workers"
        model = load_model("demo")
        session.set_model(model)
        session.set_inventory(build_inventory(model))
        session.set_data(demo_splits()[1].subset(48))
        panel.controls.ratios.setText("0.5")
        panel.controls.use_cache.setChecked(False)
        with qtbot.waitSignal(runner.finished, timeout=240_000):
            assert panel.start() is not None
        qtbot.waitUntil(lambda: not panel.running, timeout=5000)
        assert panel.where.text().startswith("Runs on local Ray at 127.0.0.1:")
        assert len(panel.report.rows) == len(panel.report.targets) == 12
        assert panel.status.text().startswith("Done: 12 cells, 12 measured")

        # back to this machine: the local instance is stopped
        again = ComputeDialog(session, runner, settings)
        qtbot.addWidget(again)
        assert again.ray.isChecked() and again.address.currentText() == "local"
        again.here.setChecked(True)
        with qtbot.waitSignal(runner.finished, timeout=60_000):
            again.accept()
        assert session.compute == Compute() and Cluster._current is None
        import ray

        assert not ray.is_initialized()
    finally:
        Cluster.shutdown()
