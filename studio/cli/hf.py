"""What ``studio scan``, ``prune`` and ``finetune`` do differently for a transformer from a
Hugging Face folder: the head/MLP/layer scan, plans allocated by head groups and MLP neurons,
the pruned model saved as a Hugging Face folder (or ONNX), and speed as prefill and decode
time. Uses studio.core only."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from studio.cli.common import TerminalProgress, calibration_arg, existing_path
from studio.core.errors import StudioError


def is_hf(model) -> bool:  # noqa: ANN001 - LoadedModel
    from studio.core.models.loaded import HUGGINGFACE

    return model.kind == HUGGINGFACE


def check_out(path: str) -> None:
    """A transformer is saved as a Hugging Face folder (no suffix) or an .onnx file."""
    suffix = Path(path).suffix.lower()
    if suffix not in ("", ".onnx"):
        raise StudioError(
            f"a transformer is saved as a Hugging Face folder (a path without a suffix) or as "
            f".onnx, not {suffix}"
        )


def save(model, path: str, protected: tuple[Path, ...]) -> Path:  # noqa: ANN001
    """Write the (pruned) transformer as a folder (save_pretrained, with its tokenizer) or as
    ONNX with dynamic batch and sequence, verified in ONNX Runtime."""
    check_out(path)
    if Path(path).suffix.lower() == ".onnx" and model.task == "vision":  # pixels in
        from studio.core.models.pruned_file import save_model

        return save_model(model, path, protected)
    if Path(path).suffix.lower() == ".onnx":
        from studio.core.export.hf_onnx import export_text_onnx

        return export_text_onnx(
            model.module,
            path,
            model.example_input(),
            model.task,
            protected=protected,
            progress=TerminalProgress("exporting to ONNX"),
        )
    from studio.core.prune.transformer import save_pretrained

    return save_pretrained(model.module.hf, path, model.tokenizer, protected=protected)


def scan(args: argparse.Namespace, model, data, use_cache: bool = True):  # noqa: ANN001
    """The head/MLP/layer scan on the calibration split (the data's, when it has one)."""
    from studio.core.scan.heads import load_head_scan, scan_heads

    if getattr(args, "scan", None):
        return load_head_scan(args.scan)
    if data is None:
        raise StudioError("sensitivity allocation scans the model on data: give --data")
    calibration = calibration_arg(args) or data
    return scan_heads(
        model, calibration, use_cache=use_cache, progress=TerminalProgress("scanning heads")
    )


def plan(args: argparse.Namespace, model, data):  # noqa: ANN001 -> PruningPlan
    """--ratio, --target-params (or --target-macs, counted as parameters of the layers'
    projections) for a transformer."""
    from dataclasses import replace

    from studio.core.plan.plan import PruningPlan
    from studio.core.plan.transformer import allocate_transformer
    from studio.core.prune.engine import prune_targets

    method = args.method or "structured"
    if method not in ("structured", "blocks"):
        raise StudioError(
            f"--method {method} is not built for transformers: use structured (head groups and "
            "MLP neurons) or blocks (whole layers)"
        )
    base = PruningPlan(
        method,
        "activation" if data is not None else "l2",
        model_fingerprint=model.fingerprint(),
        recalibrate_bn=False,
        cap=1.0,
    )
    names = prune_targets(model, method)
    if method == "blocks":
        fraction = args.ratio if args.ratio is not None else None
        if fraction is None:
            raise StudioError("depth pruning takes --ratio R: the fraction of layers removed")
        report = scan(args, model, data)
        count = int(len(names) * fraction + 1e-9)
        order = sorted(range(len(names)), key=lambda i: report.layer_drop[i])
        chosen = {names[i] for i in order[:count]}
        ratios = {n: 1.0 if n in chosen else 0.0 for n in names}
        return replace(base.with_ratios(ratios), target={"ratio": fraction})
    if args.ratio is not None:
        return replace(
            base.with_ratios({n: args.ratio for n in names}), target={"ratio": args.ratio}
        )
    strategy = args.allocate or ("sensitivity" if data is not None or args.scan else "uniform")
    if strategy not in ("uniform", "sensitivity"):
        raise StudioError(
            f"--allocate {strategy} is not built for transformers: uniform or sensitivity"
        )
    report = scan(args, model, data) if strategy == "sensitivity" else None
    if args.target_latency is not None:
        from studio.core.latency.lm_target import reach_lm_latency

        plan, best = reach_lm_latency(
            model, str(args.target_latency), strategy, report, base, threads=args.threads or 1,
            progress=TerminalProgress("meeting the latency target"),
        )  # fmt: skip
        what = "decode" if model.task == "causal-lm" else "prefill"
        print(
            f"note: {what} {best.before_ms:.3f} -> {best.after_ms:.3f} ms measured "
            f"({best.measured:.0%} of the original) with {best.params:.0%} of the parameters",
            file=sys.stderr,
        )
        return plan
    kind = "params" if args.target_params is not None else "macs"
    fraction = args.target_params if kind == "params" else args.target_macs
    return allocate_transformer(model, fraction, strategy, report, base=base, kind=kind)


def print_quality(result) -> None:  # noqa: ANN001 - PruneResult
    before, after = result.quality_before, result.quality_after
    if before is None or after is None:
        return
    for key in ("perplexity", "loss", "agreement", "cosine"):
        b, a = getattr(before, key), getattr(after, key)
        if b is not None and a is not None:
            print(f"  {key:<12} {b:.4f} -> {a:.4f}")


def speed(model, pruned, threads: int | None) -> dict | None:  # noqa: ANN001
    """Prefill and per-token decode time of the pruned model against the original, measured
    side by side (torch, batch 1)."""
    from studio.core.latency.decode import compare_lm_latency

    TerminalProgress("timing against the original")(0.0, "")
    try:
        result = compare_lm_latency(
            model.module, pruned.module, prompt_len=int(model.input_shape[-1]),
            threads=threads or 1,
        )  # fmt: skip
    except StudioError as exc:
        print(f"note: speed not measured: {exc}", file=sys.stderr)
        return None
    return result if isinstance(result, dict) else getattr(result, "to_dict", lambda: None)()


def print_scan(report, model, data, as_json: bool) -> None:  # noqa: ANN001 - HeadScan
    shown = report.shown
    unit = "perplexity increase" if report.metric == "perplexity" else "cosine lost"
    if as_json:
        print(
            json.dumps(
                {
                    "metric": report.metric,
                    "baseline": report.baseline_shown,
                    "layers": report.layers,
                    "groups": report.groups,
                    "seconds": round(report.seconds, 3),
                    "cached": report.cached,
                }
            )
        )
        return
    base = f"{report.baseline_shown:.3f}" if report.metric == "perplexity" else "1.000 (cosine)"
    print(
        f"transformer scan of {model.name} on {data.name} ({report.samples} sequences): "
        f"{report.metric} baseline {base}; cells are the {unit}"
    )
    groups = max(report.groups)
    heads = shown(report.head_drop)
    header = "".join(f"{'g' + str(g):>9}" for g in range(groups))
    print(f"{'layer':<20}{header}   | MLP " + " ".join(f"{r:.0%}" for r in report.mlp_ratios))
    mlp = shown(report.mlp_drop)
    layer = shown(report.layer_drop)
    for i, name in enumerate(report.layers):
        cells = "".join(
            f"{heads[i, g]:>9.3f}"
            if g < report.groups[i] and not math.isnan(heads[i, g])
            else " " * 9
            for g in range(groups)
        )
        curve = " ".join(f"{v:.3f}" for v in mlp[i])
        print(f"{name:<20}{cells}   | {curve}   layer {layer[i]:.3f}")
    print(
        f"{len(report.layers)} layers in {report.seconds:.1f}s"
        + (" (from the cache)" if report.cached else "")
    )


def protected_inputs(args: argparse.Namespace, model) -> tuple[Path, ...]:  # noqa: ANN001
    paths = [model.path, existing_path(getattr(args, "data", None))]
    return tuple(p for p in paths if p is not None)
