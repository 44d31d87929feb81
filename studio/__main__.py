"""``python -m studio`` / ``studio``: no arguments opens the GUI, a subcommand runs headless."""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    if not argv:
        from studio.ui.app import run_gui

        return run_gui()
    from studio.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
