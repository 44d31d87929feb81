"""The real app in a real X window (xcb) under Xvfb, saving a screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    shutil.which("xvfb-run") is None and not os.environ.get("CI"),
    reason="xvfb-run is not installed (this test always runs in CI)",
)
def test_gui_screenshot_under_xvfb(tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}  # real xcb platform
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # keep the user's settings untouched
    env["STUDIO_CACHE_DIR"] = str(tmp_path / "cache")  # the scan is measured, not cached
    command = [
        "xvfb-run",
        "-a",
        "-s",
        "-screen 0 1400x900x24",
        sys.executable,
        "-m",
        "studio",
        "gui",
        "--model",
        "demo",
        "--data",
        "demo",
        "--scan",
        "--screenshot",
        str(shot),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.exists()
    image = QImage(str(shot))
    assert image.width() >= 800 and image.height() >= 500
    colours = {
        image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)
    }
    assert len(colours) > 10, "the screenshot is a flat colour"
    # the heatmap's darkest reds (ColorBrewer YlOrRd) are there: the scan ran and was drawn
    reds = {c for c in colours if (c >> 16) & 255 > 100 and (c >> 8) & 255 < 60 and c & 255 < 60}
    assert reds, "no sensitive cells drawn in the heatmap"
