"""Headless command line: ``studio info | eval | scan | prune | finetune | export | latency |
report | view | gui``. One module per command (its parser and its function), ``common`` for
the shared options and loading. Uses studio.core only; ``gui`` imports the window lazily.

Imports run: ``__init__`` -> command modules -> ``common`` -> studio.core; a command module never
imports another command module or this package."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from studio.core.errors import StudioError

# command -> (module, the function that adds its parser, the function that runs it)
COMMANDS = {
    "info": ("info", "add_info_parser", "cmd_info"),
    "eval": ("info", "add_eval_parser", "cmd_eval"),
    "scan": ("scan", "add_scan_parser", "cmd_scan"),
    "prune": ("prune", "add_prune_parser", "cmd_prune"),
    "finetune": ("finetune", "add_finetune_parser", "cmd_finetune"),
    "export": ("export", "add_export_parser", "cmd_export"),
    "latency": ("latency", "add_latency_parser", "cmd_latency"),
    "report": ("report", "add_report_parser", "cmd_report"),
    "view": ("view", "add_view_parser", "cmd_view"),
    "gui": ("gui", "add_gui_parser", "cmd_gui"),
}


def _command(name: str, which: int):  # type: ignore[no-untyped-def]
    module, *functions = COMMANDS[name]
    return getattr(importlib.import_module(f"studio.cli.{module}"), functions[which - 1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Pruning Studio (headless)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        _command(name, 1)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    before = _ray_connection()
    try:
        return _command(args.command, 2)(args)
    except StudioError as exc:
        print(f"studio: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, the traceback only on request
        if os.environ.get("STUDIO_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"studio: unexpected error: {type(exc).__name__}: {first} "
            "(set STUDIO_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if _ray_connection() is not before:  # Ray started or joined for this command
            sys.modules["studio.core.cluster.connection"].Cluster.shutdown()


def _ray_connection() -> object:
    cluster = sys.modules.get("studio.core.cluster.connection")
    return cluster.Cluster._current if cluster is not None else None
