"""``studio latency``: measured latency on this machine (ONNX Runtime or PyTorch), the per-layer
breakdown, the prediction for a plan beside its measurement (anchored, as the Latency tab
anchors, to the unpruned model measured in the same run), and estimates for target devices.
(``studio prune --target-latency`` builds its predictor in :func:`common.latency_target`.)"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from studio.cli.common import TerminalProgress, add_model_args, load_model_arg
from studio.core.errors import StudioError

if TYPE_CHECKING:
    from studio.core.latency.types import LatencyMeasurement
    from studio.core.models.loaded import LoadedModel
    from studio.core.plan.plan import PruningPlan

RUNTIMES = ("onnxruntime", "torch")  # studio.core.latency.types.RUNTIMES


def add_latency_parser(sub: argparse._SubParsersAction) -> None:
    """The ``latency`` subcommand's arguments."""
    la = sub.add_parser(
        "latency", help="measure latency, per-layer profile, predict a plan, estimate devices"
    )
    add_model_args(la, required=False)
    la.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    la.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    la.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    la.add_argument("--cuda", action="store_true", help="measure on the GPU (--runtime torch)")
    la.add_argument("--budget", type=float, default=3.0, metavar="S", help="seconds of timing")
    la.add_argument("--per-layer", action="store_true", help="print the per-layer breakdown")
    la.add_argument("--top", type=int, default=10, metavar="N", help="layers shown (default 10)")
    la.add_argument(
        "--device-profile",
        "--device",
        dest="device",
        metavar="NAME|FILE",
        help="estimate on a target device profile (see --list-devices)",
    )
    la.add_argument("--dtype", choices=("fp32", "fp16", "int8"), help="for --device-profile")
    la.add_argument("--list-devices", action="store_true", help="list device profiles and exit")
    la.add_argument("--predict", action="store_true", help="predicted latency beside measured")
    la.add_argument("--recipe", metavar="FILE", help="with --predict: the plan to predict")
    la.add_argument("--calibrate", action="store_true", help="re-run the micro-benchmarks")
    la.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_latency(args: argparse.Namespace) -> int:
    """Run ``studio latency``."""
    from studio.core.latency.measure import measure_latency, profile_layers
    from studio.core.plan.plan import PruningPlan

    if args.list_devices:
        return _list_devices(args.json)
    if not args.model:
        raise StudioError("give --model SPEC (or --list-devices)")
    if args.recipe:  # the plan's latency is measured on the pruned model: predict it beside
        args.predict = True
    device = "cuda" if args.cuda else "cpu"
    predicting = args.predict or args.calibrate
    if predicting and device == "cuda":
        raise StudioError("predictions are for the CPU: leave out --cuda")
    profile = _device(args.device) if args.device else None
    plan = PruningPlan.load(args.recipe) if args.recipe else None
    model = load_model_arg(args)
    measured_model = model
    if plan is not None:
        from studio.core.prune.engine import prune

        measured_model = prune(model, plan, progress=TerminalProgress("pruning")).model
    out: dict = {"model": model.name, "recipe": args.recipe}
    result = measure_latency(
        measured_model,
        args.runtime,
        args.batch,
        args.threads,
        device,
        max_seconds=args.budget,
        progress=TerminalProgress("measuring"),
    )
    original = result
    if predicting and plan is not None:
        result, original = _with_original(args, model, measured_model, result)
    out.update(result.to_dict())
    layers = []
    if args.per_layer or args.json:
        layers = profile_layers(
            measured_model,
            args.runtime,
            args.batch,
            result.threads,
            device,
            progress=TerminalProgress("profiling"),
        )
        out["layers"] = [layer.to_dict() for layer in layers]
    if predicting:
        out.update(_predict(args, model, plan, result, original))
    if profile is not None:
        from studio.core.latency.devices_estimate import DeviceEstimator

        estimate = DeviceEstimator.build(model, args.batch).estimate(profile, plan, args.dtype)
        out.update(
            device_profile=profile.name,
            device_title=profile.title,
            device_source=profile.source,
            dtype=estimate.dtype,
            estimated_ms=estimate.total_ms,
            energy_mj=estimate.energy_mj,
            estimated_label=estimate.label,
            sparsity_used=estimate.sparsity_used,
            device_layers=[layer.to_dict() for layer in estimate.layers],
        )
        out["device"] = profile.name  # the key; the measuring device is 'measured_on'
        out["measured_on"] = device
    if args.json:
        print(json.dumps(out))
        return 0
    _print(out, args.top, bool(layers))
    return 0


def _with_original(
    args: argparse.Namespace,
    model: LoadedModel,
    pruned: LoadedModel,
    result: LatencyMeasurement,
) -> tuple[LatencyMeasurement, LatencyMeasurement]:
    """The unpruned ``model`` measured now, and the quiet figures of both it and the pruned
    model from interleaved passes (one after the other, a slow spell of this machine during
    one of them would show as a difference between the two)."""
    from studio.core.latency.fit import quiet_side_by_side
    from studio.core.latency.measure import measure_latency

    original = measure_latency(
        model,
        args.runtime,
        args.batch,
        result.threads,
        "cpu",
        max_seconds=args.budget,
        progress=TerminalProgress("measuring the unpruned model"),
    )
    result, original = quiet_side_by_side(
        [pruned, model], [result, original], args.budget, TerminalProgress("side by side")
    )
    return result, original


def _predict(
    args: argparse.Namespace,
    model: LoadedModel,
    plan: PruningPlan | None,
    result: LatencyMeasurement,
    original: LatencyMeasurement,
) -> dict:
    """The lookup table's estimate of ``plan`` (of the unpruned model without one), anchored
    to ``original``, the unpruned model measured now, as the Latency tab anchors: the table and
    fit (possibly calibrated under another load) keep the ratio between plans, the fresh
    measurement sets the level. Errors are against ``result``, the measured plan."""
    from studio.core.latency.predict import LatencyPredictor

    predictor = LatencyPredictor.build(
        model,
        args.runtime,
        args.batch,
        result.threads,
        progress=TerminalProgress("calibrating"),
        recalibrate=args.calibrate,
    )
    target = plan if plan is not None else {}
    table_ms = predictor.predict(target).total_ms
    predictor.anchor_to(original.quiet_ms or original.median_ms)
    predicted = predictor.predict(target)
    quiet = result.quiet_ms or result.median_ms
    return {
        "predicted_ms": predicted.total_ms,
        "predicted_label": predicted.label,
        "prediction_error": predicted.total_ms / result.median_ms - 1.0,
        "prediction_error_quiet": predicted.total_ms / quiet - 1.0,
        "predicted_layers": [layer.to_dict() for layer in predicted.layers],
        "prediction_note": predicted.note,
        "calibrated_points": predictor.calibrated_points,
        "anchored": True,
        "anchor": predictor.anchor,
        "original_median_ms": original.median_ms,
        "original_quiet_ms": original.quiet_ms,
        "predicted_original_ms": predictor.predict({}).total_ms,
        "table_ms": table_ms,
        "table_error_quiet": table_ms / quiet - 1.0,
    }


def _print(out: dict, top: int, per_layer: bool) -> None:
    what = f"{out['model']}" + (f" pruned by {out['recipe']}" if out["recipe"] else "")
    print(
        f"{what}: {out['runtime']} on {out.get('measured_on', out['device'])}, batch "
        f"{out['batch']}, {out['threads']} thread(s)"
    )
    stable = "" if out["stable"] else " (budget ran out before the median settled)"
    print(
        f"  measured   median {out['median_ms']:.3f} ms  p10 {out['p10_ms']:.3f}  "
        f"p90 {out['p90_ms']:.3f}  {out['throughput']:,.1f} samples/s  "
        f"({out['runs']} runs){stable}"
    )
    print(f"             quiet  {out['quiet_ms']:.3f} ms (the fastest block of runs' median)")
    if "predicted_ms" in out and out["recipe"]:
        print(
            f"  unpruned   median {out['original_median_ms']:.3f} ms  quiet "
            f"{out['original_quiet_ms']:.3f} ms (measured now, side by side: the anchor)"
        )
    if "predicted_ms" in out:
        print(
            f"  estimated  {out['predicted_ms']:.3f} ms by the lookup table, anchored "
            f"(unpruned {out['predicted_original_ms']:.3f} ms): error "
            f"{out['prediction_error']:+.1%} vs the median, "
            f"{out['prediction_error_quiet']:+.1%} vs quiet"
        )
        print(
            f"             {out['table_ms']:.3f} ms by the table alone "
            f"({out['table_error_quiet']:+.1%} vs quiet), x{out['anchor']:.3f} to anchor"
        )
        if out["prediction_note"]:
            print(f"             {out['prediction_note']}")
    if per_layer:
        print(f"  per layer (measured, top {top}):")
        for layer in out["layers"][:top]:
            bar = "#" * int(round(layer["share"] * 40))
            print(f"    {layer['name']:<32} {layer['op']:<16} {layer['ms']:8.3f} ms {bar}")
    if "estimated_ms" in out:
        print(
            f"  estimated on {out['device_title']} ({out['dtype']}): {out['estimated_ms']:.4f} ms, "
            f"{out['energy_mj']:.4f} mJ per batch, sparsity exploited: {out['sparsity_used']}"
        )
        rows = sorted(out["device_layers"], key=lambda r: -r["ms"])[:top]
        for row in rows:
            print(
                f"    {row['name']:<32} {row['ms']:9.4f} ms  {row['bound']}-bound  "
                f"{row['energy_mj']:.5f} mJ"
            )
        print(f"  source: {out['device_source']}")


def _device(spec: str):  # -> DeviceProfile
    from studio.core.latency.devices import find_device

    return find_device(spec)


def _list_devices(as_json: bool) -> int:
    from studio.core.latency.devices import list_devices, user_devices_dir

    profiles = list_devices()
    if as_json:
        print(json.dumps([p.to_dict() for p in profiles]))
        return 0
    for p in profiles:
        peaks = ", ".join(f"{k} {v / 1e12:g} T" for k, v in p.peak_ops.items() if v > 0)
        print(
            f"{p.name:<20} {p.title}  [{peaks}ops/s, {p.memory_bandwidth / 1e9:g} GB/s, "
            f"sparsity {p.sparsity}]"
        )
    print(f"(add your own .yaml profiles to {user_devices_dir()})", file=sys.stderr)
    return 0
