"""A native crash in a command ends it with one line naming the step and a non-zero exit
(studio.core.isolation.contain_command), not a bare "Segmentation fault"."""

from __future__ import annotations

import signal
import subprocess
import sys

# the real entry point; the training step is replaced by a null dereference (a SIGSEGV in
# native code, as oneDNN's was) before the command starts
CRASHING_FINETUNE = """
import ctypes, sys
import studio.core.train.finetune as finetune
def crash(*args, **kwargs):
    ctypes.string_at(0)
finetune.train_step = crash
sys.argv = ["studio", "finetune", "--model", "demo", "--data", "demo:train", "--epochs", "1",
            "--out", sys.argv[1]]
from studio.__main__ import main
raise SystemExit(main())
"""


def test_a_native_crash_in_finetune_is_one_line_naming_the_step(tmp_path) -> None:
    out = tmp_path / "tuned.pt"
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_FINETUNE, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 128 + signal.SIGSEGV
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(
        "studio: error: studio finetune crashed in native code (SIGSEGV) during 'training"
    ), done.stderr[-2000:]
    assert "Segmentation fault" not in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_command_that_works_keeps_its_output_and_exit_status() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "studio", "info", "--model", "zoo:resnet20", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0 and '"layers"' in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "studio", "info", "--model", "no-such-file.pt"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("studio: error:")
    assert len(bad.stderr.strip().splitlines()) == 1
