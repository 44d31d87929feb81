"""GUI test fixtures: offscreen Qt, throwaway settings, and no worker thread left running."""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before anything imports Qt

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import QSettings, QThreadPool  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from studio.ui.runner import running_job_count  # noqa: E402


@pytest.fixture(autouse=True)
def settings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test gets its own empty settings folder; the user's settings are never touched."""
    path = tmp_path_factory.mktemp("settings")
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(path))
    return path


@pytest.fixture(autouse=True)
def _dangling_threads(qtbot) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Fail a test that leaves a job or any QThreadPool thread running (after a short grace)."""
    yield
    pools = [QThreadPool.globalInstance()]

    def busy() -> int:
        return running_job_count() + sum(p.activeThreadCount() for p in pools)

    if busy():
        try:
            qtbot.waitUntil(lambda: busy() == 0, timeout=2000)
        except Exception:  # noqa: BLE001 - waitUntil raises its own TimeoutError type
            count = busy()
            from studio.ui.runner import _runners

            for runner in list(_runners):
                runner.shutdown(timeout=30)
            pytest.fail(f"test left {count} worker thread(s) running", pytrace=False)


LOAD_TIMEOUT_MS = 60_000


@pytest.fixture
def window(qtbot):  # type: ignore[no-untyped-def]
    """A fresh main window, closed (jobs cancelled and joined) at the end of the test."""
    from studio.ui.main_window import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.show()
    yield win
    win.close()


@pytest.fixture
def wait_idle(qtbot):  # type: ignore[no-untyped-def]
    """``wait_idle(window)``: wait until all the window's jobs ended and were applied."""

    def wait(win) -> None:  # type: ignore[no-untyped-def]
        qtbot.waitUntil(lambda: not win.runner.is_busy(), timeout=LOAD_TIMEOUT_MS)

    return wait


@pytest.fixture
def dialogs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record error dialogs and confirmation questions instead of showing them."""
    seen: dict[str, list] = {
        "critical": [],
        "question": [],
        "answer": [QMessageBox.StandardButton.No],
    }

    def critical(parent, title, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["critical"].append((title, text))
        return QMessageBox.StandardButton.Ok

    def question(parent, title, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["question"].append((title, text))
        return seen["answer"][0]

    monkeypatch.setattr(QMessageBox, "critical", staticmethod(critical))
    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    return seen
