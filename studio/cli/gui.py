"""``studio gui``: open the window (optionally loading, scanning, applying a recipe,
fine-tuning, measuring latency, or saving a screenshot); the only command that imports the UI."""

from __future__ import annotations

import argparse

from studio.cli.common import add_data_args, add_model_args
from studio.core.errors import StudioError

# the same as studio.ui.main_window.TABS (the CLI does not import Qt to learn it)
GUI_TABS = ("layers", "sensitivity", "sparsity", "planner", "result", "training", "latency")


def add_gui_parser(sub: argparse._SubParsersAction) -> None:
    gui = sub.add_parser("gui", help="open the studio window")
    add_model_args(gui, required=False)
    add_data_args(gui, required=False)
    gui.add_argument(
        "--screenshot", metavar="FILE.png", help="load, render the window to FILE.png and exit"
    )
    gui.add_argument("--tab", choices=GUI_TABS, help="the tab to show first")
    gui.add_argument("--recipe", metavar="FILE.yaml", help="load a pruning recipe into the Planner")
    gui.add_argument("--apply", action="store_true", help="apply the --recipe once data is in")
    gui.add_argument(
        "--finetune",
        type=int,
        metavar="EPOCHS",
        help="fine-tune the pruned model for EPOCHS in the Training tab once a plan is applied",
    )
    gui.add_argument(
        "--latency",
        action="store_true",
        help="measure every variant's latency (after --apply/--finetune) in the Latency tab",
    )
    gui.add_argument(
        "--scan",
        action="store_true",
        help="start a sensitivity scan once the model and data are loaded (exact, structured; "
        "for a transformer its head/MLP/layer scan)",
    )
    gui.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run scans and fine-tuning on Ray for this session (as Settings > Compute)",
    )
    gui.add_argument("--workers", type=int, help="Ray workers (with --ray)")


def cmd_gui(args: argparse.Namespace) -> int:
    from studio.ui.app import run_gui

    return run_gui(
        args.model,
        args.data,
        seq_len=_seq_len(args),
        screenshot=args.screenshot,
        tab=args.tab,
        scan=args.scan,
        recipe=args.recipe,
        apply=args.apply,
        finetune=args.finetune,
        latency=args.latency,
        compute=_compute(args),
    )


def _seq_len(args: argparse.Namespace) -> int | None:
    """``--seq-len`` for a language model from a folder (demo-lm or DIR)."""
    from pathlib import Path

    if args.seq_len is None:
        return None
    if not args.model or not (args.model == "demo-lm" or Path(args.model).is_dir()):
        raise StudioError(
            "--seq-len is for a language model from a Hugging Face folder (--model demo-lm or DIR)"
        )
    if not 8 <= args.seq_len <= 8192:
        raise StudioError(f"--seq-len must be between 8 and 8192, not {args.seq_len}")
    return int(args.seq_len)


def _compute(args: argparse.Namespace):  # -> Compute | None
    from studio.core.cluster.connection import Compute, check_address, require_ray

    if args.workers is not None and not args.ray:
        raise StudioError("--workers needs --ray ADDRESS")
    if args.workers is not None and args.workers < 1:
        raise StudioError(f"workers must be at least 1, got {args.workers}")
    if not args.ray:
        return None
    require_ray()
    return Compute(check_address(args.ray), args.workers)
