"""``studio view FILE``: show a model file's graph in Netron, served on 127.0.0.1 only.

The viewer opens in the system browser (``--no-browser`` prints the address instead) and
runs until Ctrl+C. The page is served without netron's consent banner and usage reporting
(see :mod:`studio.core.export.netron_server`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading


def add_view_parser(sub: argparse._SubParsersAction) -> None:
    """The ``view`` subcommand's arguments."""
    vw = sub.add_parser("view", help="show a model file's graph in Netron (127.0.0.1, browser)")
    vw.add_argument("file", metavar="FILE", help="a model file netron reads (.onnx .pt .pt2 …)")
    vw.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    vw.add_argument(
        "--no-browser", action="store_true", help="print the address instead of opening a browser"
    )
    vw.add_argument("--json", action="store_true", help="print the address as one JSON object")


def cmd_view(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until Ctrl+C (or until ``stop`` is set: tests)."""
    from studio.core.export.netron_server import NetronServer

    server = NetronServer(args.file, port=args.port)
    try:
        if args.json:
            print(json.dumps({"url": server.url, "file": str(server.model)}), flush=True)
        else:
            print(f"Netron: {server.model.name} at {server.url} (Ctrl+C stops)", flush=True)
        if not args.no_browser:
            import webbrowser

            if not webbrowser.open(server.url):
                print(f"no web browser found: open {server.url}", file=sys.stderr)
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
