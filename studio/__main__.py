"""``python -m studio`` / ``studio``: no arguments opens the GUI, a subcommand runs headless."""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    if not argv:
        from studio.ui.app import run_gui

        return run_gui()
    from studio.cli import main as cli_main
    from studio.core.command_guard import contain_command

    # a native crash (torch/oneDNN, ONNX Runtime) ends the command with one line naming the
    # step, not a bare "Segmentation fault"
    if argv[0] == "gui":  # the window contains its jobs itself
        return cli_main(argv)
    return contain_command(lambda: cli_main(argv), f"studio {argv[0]}")


if __name__ == "__main__":
    raise SystemExit(main())
