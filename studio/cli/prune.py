"""``studio prune``: apply a recipe, a uniform ratio, or a parameter/MAC target allocated by a
strategy; save the pruned model (loadable by ``studio info/eval``) and the recipe it used."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import studio.cli.hf as hf
from studio.cli.common import (
    TerminalProgress,
    add_data_args,
    add_model_args,
    calibration_arg,
    channel_multiple_arg,
    existing_path,
    load_data_arg,
    load_model_arg,
    scan_for_allocation,
)
from studio.core.errors import StudioError

METHODS = ("structured", "unstructured", "nm", "blocks")  # studio.core.plan.plan.METHODS
CRITERIA = ("l2", "l1", "taylor", "bn_scale", "apoz", "activation", "random")  # plan.CRITERIA
NEEDS_DATA = ("taylor", "apoz", "activation")  # studio.core.plan.plan.NEEDS_DATA
STRATEGIES = ("uniform", "global", "sensitivity")  # studio.core.plan.allocate.STRATEGIES
MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".onnx")  # studio.core.models.pruned_file.SUFFIXES
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    """The ``prune`` subcommand's arguments."""
    pr = sub.add_parser(
        "prune", help="prune by a recipe, a ratio or a params/MACs target; save the model"
    )
    add_model_args(pr)
    add_data_args(pr, required=False)
    pr.add_argument("--recipe", metavar="FILE", help="replay a recipe (.yaml or .json)")
    pr.add_argument("--method", choices=METHODS, help="default: structured")
    pr.add_argument("--criterion", choices=CRITERIA, help="default: l2 (apoz etc. need --data)")
    how = pr.add_mutually_exclusive_group()
    how.add_argument("--ratio", type=float, metavar="R", help="the same ratio on every target")
    how.add_argument("--target-params", type=float, metavar="F", help="keep this fraction")
    how.add_argument("--target-macs", type=float, metavar="F", help="keep this fraction")
    how.add_argument(
        "--target-latency",
        metavar="F|MSms",
        help="latency to reach: a fraction of the unpruned model's (0.6 or 0.6x) or "
        "milliseconds (2.5ms); structured; see --runtime, --batch, --threads. A language "
        "model: its decode time per token, measured (0.6, or a speed such as 300tok/s)",
    )
    pr.add_argument("--runtime", choices=("onnxruntime", "torch"), help="for --target-latency")
    pr.add_argument("--batch", type=int, default=1, help="batch size for --target-latency")
    pr.add_argument("--threads", type=int, help="threads for --target-latency (default: all)")
    pr.add_argument(
        "--allocate",
        choices=STRATEGIES,
        help="for a target (default: sensitivity with --data or --scan, else uniform)",
    )
    pr.add_argument(
        "--scan",
        metavar="FILE.json",
        help="a scan (studio scan --out) to allocate by (default with --allocate sensitivity: "
        "scan on --data now, or reuse the cached scan)",
    )
    pr.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    pr.add_argument(
        "--round-to",
        metavar="runtime|exact|N",
        help="structured: the channel counts kept. runtime (default): multiples of the block "
        "the --runtime runs fast on this machine (ONNX Runtime: 8 with AVX2, 16 with AVX-512); "
        "exact: the ratios as allocated; N: multiples of N",
    )
    pr.add_argument(
        "--calib-data",
        metavar="SPEC",
        help="data the pruned model's batch-norm statistics are re-estimated on (default: "
        "--data; 'demo:train' is the demo's training split)",
    )
    pr.add_argument(
        "--no-recalibrate-bn",
        action="store_true",
        help="keep the unpruned model's batch-norm statistics",
    )
    pr.add_argument(
        "--out",
        required=True,
        metavar="MODEL.pt|MODEL.pt2|MODEL.onnx",
        help="pruned model: .pt (built-in architectures), .pt2 (torch.export) or .onnx (checked "
        "in ONNX Runtime; an ONNX model keeps its input/output names, dynamic dims and opset)",
    )
    pr.add_argument("--recipe-out", metavar="FILE.yaml|FILE.json", help="save the plan used")
    pr.add_argument(
        "--no-speed-check",
        action="store_true",
        help="do not time the pruned model against the original (--runtime, --batch, --threads)",
    )
    pr.add_argument("--json", action="store_true", help="print one JSON object")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or incomplete arguments before loading anything."""
    targets = [
        f
        for f in ("ratio", "target_params", "target_macs", "target_latency")
        if getattr(args, f) is not None
    ]
    if args.recipe:
        extra = [
            f"--{f.replace('_', '-')}"
            for f in ("method", "criterion", "ratio", "target_params", "target_macs", "allocate")
            + ("target_latency",)
            + ("scan",)
            if getattr(args, f) is not None
        ]
        if args.no_recalibrate_bn:
            extra.append("--no-recalibrate-bn")
        if args.round_to is not None:
            extra.append("--round-to")
        if extra:
            raise StudioError(f"--recipe replays a saved plan: leave out {', '.join(extra)}")
    elif not targets:
        raise StudioError(
            "say how much to prune: --recipe FILE, --ratio R, --target-params F, --target-macs F "
            "or --target-latency F"
        )
    if args.ratio is not None and (args.allocate or args.scan):
        raise StudioError("--allocate and --scan go with --target-params or --target-macs")
    if args.ratio is not None and not 0.0 < args.ratio <= 1.0:
        raise StudioError(f"--ratio is a fraction in (0, 1], not {args.ratio:g}")
    if args.criterion in NEEDS_DATA and not args.data:
        why = "its gradient pass" if args.criterion == "taylor" else "measuring activations"
        raise StudioError(f"the {args.criterion} criterion needs data for {why}: give --data")
    if Path(args.out).suffix.lower() not in (*MODEL_SUFFIXES, ""):
        raise StudioError(
            f"--out must end in .pt, .pth, .pt2 or .onnx (a transformer: a folder or .onnx), "
            f"got {args.out}"
        )
    if args.recipe_out and Path(args.recipe_out).suffix.lower() not in RECIPE_SUFFIXES:
        raise StudioError(f"--recipe-out must end in .yaml or .json, got {args.recipe_out}")


def _plan(args: argparse.Namespace, model, data):  # -> PruningPlan
    from studio.core.plan.plan import PruningPlan

    if args.recipe:
        return PruningPlan.load(args.recipe)
    method, criterion = args.method or "structured", args.criterion or "l2"
    round_to = channel_multiple_arg(args) if method == "structured" else 1
    base = PruningPlan(
        method,
        criterion,
        model_fingerprint=model.fingerprint(),
        seed=args.seed,
        recalibrate_bn=not args.no_recalibrate_bn,
        round_to=round_to,
    )
    from studio.core.plan.allocate import CostModel, allocate, round_channels

    if args.ratio is not None:
        ratios = _uniform(model, method, args.ratio, base.cap, data)
        if round_to > 1 and method == "structured":
            cost = CostModel.build(model, method)
            rounded = round_channels(cost, cost.ratio_vector(ratios), round_to)
            ratios = {n: float(r) for n, r in zip(cost.names, rounded) if n in ratios}
        return replace(base.with_ratios(ratios), target={"ratio": args.ratio})

    kind = "params" if args.target_params is not None else "macs"
    fraction = args.target_params if kind == "params" else args.target_macs
    # by sensitivity when there is data to scan on (the scan is cached), else the same ratio
    strategy = args.allocate or ("sensitivity" if data is not None or args.scan else "uniform")
    report = None
    if args.scan or (strategy == "sensitivity" and method != "blocks"):
        report = scan_for_allocation(args, model, data, method)
    cost = CostModel.build(model, method)
    weights = _layer_weights(args, model, cost, base, strategy)
    if args.target_latency is not None:
        return _latency_plan(args, model, data, cost, base, strategy, report, weights)
    return allocate(
        cost,
        base,
        strategy,
        kind,
        fraction,
        report=report,
        module=model.module,
        data=data,
        layer_weights=weights,
    )


def _layer_weights(args, model, cost, base, strategy: str):  # -> np.ndarray | None
    """Sensitivity on runtime channels allocates by drop per millisecond saved: each layer's
    ms per MAC from the unpruned model's profile in --runtime (studio.core.latency.weights)."""
    if strategy != "sensitivity" or base.method != "structured" or base.round_to <= 1:
        return None
    from studio.core.latency.weights import layer_weights

    return layer_weights(
        model,
        cost,
        args.runtime or "onnxruntime",
        args.batch,
        args.threads,
        progress=TerminalProgress("profiling the layers"),
    )


def _latency_plan(args, model, data, cost, base, strategy: str, report, weights):
    """--target-latency: the predictor's plan first, then measured candidates until one lands
    within 5 % of the target on this machine (studio.core.latency.target)."""
    from studio.cli.common import latency_target
    from studio.core.latency.target import reach_latency
    from studio.core.plan.allocate import allocate

    predictor, fraction = latency_target(args, model, cost)
    try:
        first = allocate(
            cost, base, strategy, "latency", fraction, report, model.module, data, predictor,
            weights,
        )  # fmt: skip
    except StudioError:  # the predictor sees no plan that fast: measuring may still find one
        first = None
    return reach_latency(
        model,
        cost,
        base,
        strategy,
        fraction,
        predictor.runtime,
        predictor.batch,
        predictor.threads,
        report,
        data,
        first,
        progress=TerminalProgress("meeting the latency target"),
        predictor=predictor,
        layer_weights=weights,
    )


def _uniform(model, method: str, ratio: float, cap: float, data) -> dict[str, float]:
    """--ratio R: R on every target; for blocks, the fraction R of the blocks is removed,
    those whose branch changes their input least (on the data, else the example input)."""
    from studio.core.prune.engine import prune_targets

    if method != "blocks" and ratio > cap:
        raise StudioError(f"--ratio {ratio:g} is above the per-layer cap {cap:g}")
    names = prune_targets(model, method)
    if not names:
        raise StudioError(f"{model.name} has nothing to prune with the {method} method")
    if method != "blocks":
        return {n: ratio for n in names}
    import copy

    from studio.core.models.blocks import BlockTarget, branch_scores

    module = copy.deepcopy(model.module).eval()
    x = data.x[:256] if data is not None else model.example_input()
    scores = branch_scores(module, [BlockTarget(n, 0) for n in names], x)
    weakest = sorted(names, key=lambda n: scores.get(n, float("inf")))
    count = int(len(names) * ratio + 1e-9)
    return {n: (1.0 if n in weakest[:count] else 0.0) for n in names}


def cmd_prune(args: argparse.Namespace) -> int:
    """Run ``studio prune``."""
    from studio.core.models.pruned_file import check_destination, save_model
    from studio.core.prune.engine import prune

    _check_args(args)
    if args.recipe:  # a bad recipe fails before the model loads
        from studio.core.plan.plan import PruningPlan

        PruningPlan.load(args.recipe)
    model = load_model_arg(args)
    data = load_data_arg(args) if args.data else None
    if hf.is_hf(model):
        return _prune_hf(args, model, data)
    check_destination(model, args.out)
    plan = _plan(args, model, data)
    if not plan.active():
        raise StudioError("the plan prunes nothing: every ratio is 0")
    calibration = None
    if args.calib_data:
        from studio.core.models.data import load_data

        calibration = load_data(args.calib_data)
    result = prune(model, plan, data, progress=TerminalProgress("pruning"), calibration=calibration)
    inputs = (
        model.path,
        existing_path(args.data),
        existing_path(args.recipe),
        existing_path(args.calib_data),
    )
    protected = tuple(p for p in inputs if p)
    saved_notes: list[str] = []  # about the file (an opset other than the original's)
    save_model(result.model, args.out, protected, saved_notes)
    for note in saved_notes:
        print(f"note: {note}", file=sys.stderr)
    if args.recipe_out:
        plan.save(args.recipe_out, protected + (Path(args.out),))
    summary = dict(result.to_dict(), out=args.out, recipe_out=args.recipe_out)
    summary["notes"] += saved_notes
    summary["targets"] = len(plan.active())
    summary["target"] = dict(plan.target)  # what was asked, and for latency what was measured
    speed = None
    if not args.no_speed_check and plan.method in ("structured", "blocks"):
        from studio.core.latency.speed_check import check_speed

        speed = check_speed(
            model,
            result.model,
            args.runtime or "onnxruntime",
            args.batch,
            args.threads,
            progress=TerminalProgress("timing against the original"),
        )
        summary["speed_check"] = speed.to_dict()
    summary["speedup"] = speed.speedup if speed is not None else None
    if args.json:
        summary.pop("shapes")
        print(json.dumps(summary))
        return 0
    _print_summary(result, summary)
    if speed is not None:
        print(f"  speed        {speed.line()}")
        if speed.off_path:
            print("  fix          studio prune ... --round-to runtime (the default)")
    elif plan.method in ("unstructured", "nm") and not args.no_speed_check:
        print("  speed        not timed: zeros make the file compress, not a dense runtime faster")
    return 0


def _prune_hf(args: argparse.Namespace, model, data) -> int:
    """``studio prune`` of a transformer: head groups and MLP neurons (or whole layers)."""
    from studio.core.plan.plan import PruningPlan
    from studio.core.prune.engine import prune

    hf.check_out(args.out)
    plan = PruningPlan.load(args.recipe) if args.recipe else hf.plan(args, model, data)
    if not plan.active():
        raise StudioError("the plan prunes nothing: every ratio is 0")
    result = prune(
        model, plan, data, TerminalProgress("pruning"), calibration=calibration_arg(args)
    )  # heads and neurons chosen on the calibration split, quality measured on validation
    protected = hf.protected_inputs(args, model) + tuple(
        p for p in (existing_path(args.recipe),) if p
    )
    hf.save(result.model, args.out, protected)
    if args.recipe_out:
        plan.save(args.recipe_out, protected + (Path(args.out),))
    summary = dict(result.to_dict(), out=args.out, recipe_out=args.recipe_out)
    summary["targets"] = len(plan.active())
    summary["target"] = dict(plan.target)
    speed = None if args.no_speed_check else hf.speed(model, result.model, args.threads)
    summary["speed_check"] = speed
    if args.json:
        summary.pop("shapes")
        print(json.dumps(summary))
        return 0
    _print_summary(result, summary)
    if speed:
        decode = speed["decode_speedup"]
        print(
            f"  speed        prefill {speed['prefill_speedup']:.2f}x"
            + (f", decode {decode:.2f}x" if decode is not None else "")
            + f" faster (torch, {speed['threads']} thread(s), batch 1)"
        )
    return 0


def _print_summary(result, summary: dict) -> None:
    def change(before: float, after: float) -> str:
        return f"{before:,} -> {after:,} ({after / max(before, 1):.1%})"

    plan = result.plan
    print(f"{result.model.name}: {plan.method} by {plan.criterion}, {summary['targets']} targets")
    print(f"  parameters   {change(result.params_before, result.params_after)}")
    print(f"  MACs         {change(result.macs_before, result.macs_after)}")
    print(f"  size (bytes) {change(result.size_before, result.size_after)}")
    print(f"  sparsity     {result.sparsity:.1%}, compression {result.compression:.2f}x")
    before, after = result.quality_before, result.quality_after
    if before is not None and after is not None:
        for key in ("accuracy", "perplexity", "loss", "agreement", "cosine"):
            b, a = getattr(before, key), getattr(after, key)
            if b is not None and a is not None:
                print(f"  {key:<12} {b:.4f} -> {a:.4f}")
    for name, reason in result.skipped:
        print(f"  skipped      {name}: {reason}")
    for note in result.notes:
        print(f"  note         {note}")
    recipe = f" and recipe {summary['recipe_out']}" if summary["recipe_out"] else ""
    print(f"saved {summary['out']}{recipe} in {result.seconds:.1f}s")
