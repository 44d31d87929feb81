"""``studio finetune``: fine-tune a (pruned) model, optionally distilling from a teacher or
pruning gradually by a recipe; save the best epoch's model (loadable by ``studio info/eval``).

Validation data: ``--val-data`` if given; for ``--data demo:train`` the demo's validation split
(``demo``); otherwise a held-out 20% of ``--data`` (a fixed shuffle), the rest trains.

``--ray ADDRESS --workers N`` trains data-parallel on N Ray Train workers
(:class:`studio.core.cluster.finetune.RayFinetuneJob`); ``--batch-size`` is then the global batch,
split among the workers, so the learning rate means the same as in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import studio.cli.hf as hf
from studio.cli.common import (
    TerminalProgress,
    add_data_args,
    add_model_args,
    calibration_arg,
    existing_path,
    load_data_arg,
    load_model_arg,
)
from studio.core.errors import StudioError

OPTIMIZERS = ("sgd", "adamw")  # studio.core.train.types.OPTIMIZERS
SCHEDULES = ("cosine", "step", "constant")  # studio.core.train.types.SCHEDULES
MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx")
# command-line option -> FinetuneSettings field (only options given override the defaults)
SETTINGS = {
    "epochs": "epochs",
    "lr": "lr",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "schedule": "schedule",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "augment": "augment",
    "distill_temperature": "distill_temperature",
    "distill_weight": "distill_weight",
    "patience": "early_stopping_patience",
    "seed": "seed",
    "device": "device",
    "threads": "threads",
}


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    """The ``finetune`` subcommand's arguments."""
    ft = sub.add_parser(
        "finetune", help="fine-tune a pruned model (distillation, gradual pruning); save it"
    )
    add_model_args(ft)
    add_data_args(ft)
    ft.add_argument(
        "--val-data",
        metavar="SPEC",
        help="validation data (default: 'demo' for demo:train, else 20%% of --data held out)",
    )
    ft.add_argument("--teacher", metavar="SPEC", help="model to distil from (e.g. the unpruned)")
    ft.add_argument("--epochs", type=int, metavar="N", help="default 5")
    ft.add_argument("--lr", type=float, metavar="X", help="peak (sgd 0.01, adamw 0.001)")
    ft.add_argument("--batch-size", type=int, metavar="B", help="default 64")
    ft.add_argument("--optimizer", choices=OPTIMIZERS, help="default sgd (momentum 0.9)")
    ft.add_argument("--schedule", choices=SCHEDULES, help="after the warm-up (default cosine)")
    ft.add_argument("--momentum", type=float, metavar="M", help="sgd momentum (default 0.9)")
    ft.add_argument("--weight-decay", type=float, metavar="D", help="default 5e-4")
    ft.add_argument("--warmup-epochs", type=float, metavar="E", help="default 0.5")
    ft.add_argument("--augment", choices=("shift", "none"), help="default shift (2 pixels)")
    ft.add_argument("--flips", action="store_true", help="random horizontal flips too")
    ft.add_argument("--distill-temperature", type=float, metavar="T", help="default 4")
    ft.add_argument(
        "--distill-weight", type=float, metavar="W", help="share of the distillation loss (0.7)"
    )
    ft.add_argument("--patience", type=int, metavar="N", help="stop after N epochs without gain")
    ft.add_argument("--seed", type=int, metavar="S", help="shuffle and augmentation seed")
    ft.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    ft.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: every core)")
    ft.add_argument(
        "--gradual", action="store_true", help="prune by --recipe during training, in --steps"
    )
    ft.add_argument("--recipe", metavar="FILE", help="the plan gradual pruning ends at")
    ft.add_argument("--steps", type=int, metavar="N", help="gradual pruning steps (default 4)")
    ft.add_argument("--checkpoint-dir", metavar="DIR", help="keep checkpoints; continue a run")
    ft.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="train on Ray: local (start one here), auto, ray://HOST:PORT or HOST:PORT",
    )
    ft.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray Train workers with --ray (default 1); --batch-size is split among them",
    )
    ft.add_argument(
        "--out",
        required=True,
        metavar="MODEL.pt|MODEL.pt2|MODEL.onnx",
        help="trained model (.onnx: checked in ONNX Runtime; an ONNX import keeps its names, "
        "dynamic dims and opset)",
    )
    ft.add_argument("--history", metavar="FILE.csv", help="write every training record")
    ft.add_argument("--json", action="store_true", help="print one JSON object")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or incomplete arguments before loading anything."""
    if Path(args.out).suffix.lower() not in (*MODEL_SUFFIXES, ""):
        raise StudioError(
            f"--out must end in .pt, .pth, .pt2 or .onnx (a transformer: a folder or .onnx), "
            f"got {args.out}"
        )
    if args.history and not args.history.lower().endswith(".csv"):
        raise StudioError(f"--history must end in .csv, got {args.history}")
    if args.gradual and not args.recipe:
        raise StudioError("--gradual needs --recipe FILE: the plan to reach")
    if not args.gradual and (args.recipe or args.steps is not None):
        raise StudioError("--recipe and --steps go with --gradual")
    if args.steps is not None and args.steps < 1:
        raise StudioError(f"--steps must be 1 or more, not {args.steps}")
    _check_ray_args(args)
    outputs = [Path(args.out)] + ([Path(args.history)] if args.history else [])
    for spec in (args.model, args.data, args.val_data, args.teacher, args.recipe):
        if spec and any(_same(out, spec) for out in outputs):
            raise StudioError(f"refusing to write over {spec}: it is an input file")


def _check_ray_args(args: argparse.Namespace) -> None:
    if args.ray is None:
        if args.workers is not None:
            raise StudioError("--workers goes with --ray ADDRESS: the Ray Train workers to use")
        return
    from studio.core.cluster.connection import check_address, require_ray

    check_address(args.ray)
    if args.workers is not None and args.workers < 1:
        raise StudioError(f"--workers must be 1 or more, not {args.workers}")
    if args.gradual:
        raise StudioError("gradual pruning does not run on Ray yet: leave out --ray")
    if args.checkpoint_dir:
        raise StudioError(
            "fine-tuning on Ray keeps no checkpoint folder yet: leave out --ray or --checkpoint-dir"
        )
    require_ray()


def _same(out: Path, spec: str) -> bool:
    path = Path(spec)
    return path.exists() and out.resolve() == path.resolve()


def _settings(args: argparse.Namespace, text: bool = False):  # -> FinetuneSettings
    from studio.core.train.finetune import FinetuneSettings

    given = {field: getattr(args, opt) for opt, field in SETTINGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if args.flips:
        given["flips"] = True
    return FinetuneSettings.for_text(**given) if text else FinetuneSettings(**given)


def _datasets(args: argparse.Namespace):  # -> (train, val)
    from studio.core.models.data import load_data
    from studio.core.train.finetune import holdout_split

    data = load_data_arg(args)
    calibration = calibration_arg(args)
    if calibration is not None:  # text: train on the calibration split, validate on the rest
        return calibration, data
    if args.val_data:
        return data, load_data(args.val_data, unlabeled=args.unlabeled)
    if args.data == "demo:train":
        return data, load_data("demo", unlabeled=args.unlabeled)
    return holdout_split(data)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run ``studio finetune``."""
    from studio.core.files import write_atomic
    from studio.core.models.pruned_file import save_model
    from studio.core.train.finetune import FinetuneJob, GradualSchedule, history_csv

    _check_args(args)
    settings = _settings(args)
    gradual = None
    if args.gradual:
        from studio.core.plan.plan import PruningPlan

        plan = PruningPlan.load(args.recipe)
        gradual = GradualSchedule(plan, args.steps if args.steps is not None else 4)
    model = load_model_arg(args)
    from studio.core.models.pruned_file import check_destination

    if hf.is_hf(model):
        hf.check_out(args.out)
        settings = _settings(args, text=True)
    else:
        check_destination(model, args.out)
    train, val = _datasets(args)
    teacher = load_model_arg(args, args.teacher) if args.teacher else None
    if args.ray is not None:
        from studio.core.cluster.finetune import RayFinetuneJob

        job = RayFinetuneJob(
            model, train, val, settings, teacher, address=args.ray, workers=args.workers or 1
        )
        if not args.json:
            print(f"running on {job.where}", flush=True)
    else:
        job = FinetuneJob(model, train, val, settings, teacher, args.checkpoint_dir, gradual)
    if job.resumed_from and not args.json:
        print(f"continuing from epoch {job.resumed_from} in {args.checkpoint_dir}")
    for record in job.run(progress=TerminalProgress("training")):
        if record.kind == "epoch" and not args.json:
            print(_epoch_line(record, settings.epochs), file=sys.stdout, flush=True)
    result = job.result
    assert result is not None
    inputs = (
        model.path,
        existing_path(args.data),
        existing_path(args.val_data),
        existing_path(args.recipe),
    )
    inputs += (teacher.path if teacher is not None else None,)
    protected = tuple(p for p in inputs if p)
    if hf.is_hf(result.model):
        hf.save(result.model, args.out, protected)
    else:
        save_model(result.model, args.out, protected)
    if args.history:
        write_atomic(args.history, history_csv(result.history), protected + (Path(args.out),))
    summary = dict(result.to_dict(), out=args.out, history=args.history)
    if args.ray is not None:
        summary["where"] = job.where
    if args.json:
        print(json.dumps(summary))
        return 0
    _print_summary(summary)
    return 0


def _epoch_line(record, epochs: int) -> str:  # record: TrainRecord
    parts = [f"epoch {record.epoch:g}/{epochs}: loss {record.loss:.4f}"]
    if record.val_accuracy is not None:
        parts.append(f"val accuracy {record.val_accuracy:.4f}")
    if record.perplexity is not None:
        parts.append(f"val perplexity {record.perplexity:.3f}")
    if record.cosine is not None:
        parts.append(f"cosine {record.cosine:.4f}")
    if record.agreement is not None:
        parts.append(f"agreement {record.agreement:.4f}")
    if record.ratio_scale is not None:
        parts.append(f"plan {record.ratio_scale:.0%}")
    return ", ".join(parts) + (" (best)" if record.is_best else "")


def _print_summary(summary: dict) -> None:
    for key in ("accuracy", "perplexity", "cosine", "agreement", "loss"):
        before, after = summary[f"{key}_before"], summary[f"{key}_after"]
        if before is not None and after is not None:
            print(f"  {key:<10} {before:.4f} -> {after:.4f}")
    print(f"  sparsity   {summary['sparsity']:.1%}, {summary['params']:,} parameters")
    stop = " (stopped early)" if summary["stopped_early"] else ""
    print(
        f"saved {summary['out']} (best epoch {summary['best_epoch']} of "
        f"{summary['epochs_run']}{stop}) in {summary['seconds']:.1f}s"
    )
