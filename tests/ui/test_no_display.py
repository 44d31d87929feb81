"""Without a screen the GUI says so in one line instead of Qt aborting the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11/Wayland only")


def _env_without_display(tmp_path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    }
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    return env


def test_gui_without_display_is_a_one_line_error(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "studio", "gui"],
        capture_output=True,
        text=True,
        env=_env_without_display(tmp_path),
        timeout=120,
    )
    assert done.returncode == 1
    assert "no display found" in done.stderr and "xvfb-run" in done.stderr


def test_screenshot_without_display_renders_offscreen(tmp_path) -> None:
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [sys.executable, "-m", "studio", "gui", "--model", "zoo:vgg11", "--screenshot", str(shot)],
        capture_output=True,
        text=True,
        env=_env_without_display(tmp_path),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert shot.stat().st_size > 10_000
