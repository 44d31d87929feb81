"""The core and the CLI must import and run without Qt (STYLE.md: the core never imports Qt)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import studio.cli
import studio.core

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('PySide6', 'PyQt5', 'PyQt6', 'shiboken6', 'pyqtgraph', 'superqt'):
            raise ImportError('Qt is blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_core_modules_import_without_qt() -> None:
    modules = [m.name for m in pkgutil.walk_packages(studio.core.__path__, "studio.core.")]
    assert "studio.core.models.inventory" in modules
    commands = [m.name for m in pkgutil.walk_packages(studio.cli.__path__, "studio.cli.")]
    assert "studio.cli.scan" in commands
    code = BLOCKER + "\n".join(f"import {m}" for m in [*modules, "studio.cli", *commands])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_cli_info_runs_without_qt() -> None:
    code = (
        BLOCKER
        + "from studio.cli import main\nraise SystemExit(main(['info', '--model', 'zoo:resnet20']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "total:" in done.stdout


def test_blocker_really_blocks_qt() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCKER + "import PySide6"], capture_output=True)
    assert done.returncode != 0
