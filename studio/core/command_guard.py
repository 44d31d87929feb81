"""The command line's crash containment: a command runs in a forked child, and a native crash
there (torch/oneDNN, ONNX Runtime) ends it with one line on stderr naming the step it was in,
not a bare "Segmentation fault". The window's jobs have :mod:`studio.core.isolation`."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

_step_fd: int | None = None


def note_step(text: str) -> None:
    """Tell the guarding parent what the command is doing (named if it crashes)."""
    if _step_fd is not None and text:
        try:
            os.write(_step_fd, (text.replace("\n", " ")[:200] + "\n").encode())
        except OSError:
            pass


def contain_command(run: Callable[[], int], command: str) -> int:
    """Run ``run()`` (a command) in a forked child; a native crash there ends the command with
    one line on stderr naming the step, and exit status 128 + the signal's number.

    Fork is safe here: the parent has imported modules but run no parallel torch op.
    """
    global _step_fd
    if not hasattr(os, "fork") or os.environ.get("STUDIO_NO_CONTAIN"):
        return run()
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child runs the command
        os.close(read_fd)
        _step_fd = write_fd
        code = 1
        try:
            code = run()
        except BaseException:  # STUDIO_DEBUG=1 re-raises: show the traceback before _exit
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    os.close(write_fd)
    last = [b""]

    def read_notes() -> None:  # a thread: the child never blocks on a full pipe
        with os.fdopen(read_fd, "rb") as notes:
            for line in notes:
                last[0] = line

    reader = threading.Thread(target=read_notes, daemon=True)
    reader.start()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the child
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    reader.join(0.5)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    number = os.WTERMSIG(status)
    if number == signal.SIGINT:
        print("studio: interrupted", file=sys.stderr)
        return 130
    step = last[0].decode(errors="replace").strip() or command
    print(
        f"studio: error: {command} crashed in native code ({signal.Signals(number).name}) "
        f"during '{step}'",
        file=sys.stderr,
    )
    return 128 + number
