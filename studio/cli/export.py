"""``studio export``: write a verified ONNX, TorchScript, PyTorch or .pt2 file, and optionally an
INT8 ONNX model beside it, with the checks and measurements side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.cli.common import (
    TerminalProgress,
    add_data_args,
    add_model_args,
    existing_path,
    load_data_arg,
    load_model_arg,
)
from studio.core.errors import StudioError

FORMATS = ("onnx", "torchscript", "pytorch", "pt2")  # studio.core.export.exporter.FORMATS
MODES = ("dynamic", "static")  # studio.core.export.quantize.MODES


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` subcommand's arguments."""
    ex = sub.add_parser(
        "export", help="write a verified ONNX/TorchScript/PyTorch/.pt2 file, optionally INT8"
    )
    add_model_args(ex)
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=".onnx, .pt/.pth/.ts (torchscript), .pt/.pth (pytorch) or .pt2",
    )
    ex.add_argument(
        "--opset",
        type=int,
        metavar="N",
        help="ONNX opset, 11 to 20 (default: an ONNX import's own, else 17)",
    )
    ex.add_argument(
        "--no-dynamic-batch", action="store_true", help="fix the batch size of the exported file"
    )
    ex.add_argument(
        "--original",
        metavar="SPEC",
        help="the unpruned model: timed in ONNX Runtime beside the export (default: the "
        "built-in architecture unpruned, for pruned built-in models), and with --quantize the "
        "reference float and INT8 predictions are compared with",
    )
    ex.add_argument(
        "--quantize", choices=MODES, help="also write FILE.int8.onnx (ONNX Runtime, INT8)"
    )
    add_data_args(ex, required=False)
    ex.add_argument(
        "--calib-data",
        metavar="SPEC",
        help="calibration data for --quantize static (default: --data; at most 256 samples)",
    )
    ex.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    ex.add_argument("--json", action="store_true", help="print one JSON object")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory arguments before loading anything."""
    from studio.core.export.exporter import SUFFIXES

    suffix = Path(args.out).suffix.lower()
    if suffix not in SUFFIXES[args.format]:
        raise StudioError(
            f"--out of a {args.format} export must end in {' or '.join(SUFFIXES[args.format])}, "
            f"got {args.out}"
        )
    if args.opset is not None and args.format != "onnx":
        raise StudioError("--opset goes with --format onnx")
    if args.quantize and args.format != "onnx":
        raise StudioError("--quantize works on ONNX models: use --format onnx")
    if args.quantize == "static" and not (args.data or args.calib_data):
        raise StudioError("--quantize static needs calibration data: give --data (or --calib-data)")
    if args.calib_data and args.quantize != "static":
        raise StudioError("--calib-data goes with --quantize static")


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``studio export``."""
    from studio.core.export.exporter import export_model, unpruned_architecture
    from studio.core.export.quantize import int8_path, quantize_onnx

    _check_args(args)
    model = load_model_arg(args)
    data = load_data_arg(args) if args.data else None
    calibration = None
    if args.calib_data:
        from studio.core.models.data import load_data

        calibration = load_data(args.calib_data)
    original = (
        load_model_arg(args, args.original) if args.original else unpruned_architecture(model)
    )
    inputs = (
        model.path,
        original and original.path,
        existing_path(args.data),
        existing_path(args.calib_data),
    )
    protected = tuple(p for p in inputs if p)
    samples = data.x[:8] if data is not None and len(data) >= 2 else None
    result = export_model(
        model,
        args.format,
        args.out,
        original=original,
        opset=args.opset,
        dynamic_batch=not args.no_dynamic_batch,
        samples=samples,
        measure_latency=not args.no_latency,
        protected=protected,
        progress=TerminalProgress("exporting"),
    )
    if original is not None and original is not model and args.original is None:
        if result.ort_ms_original is not None:
            result.notes.append(
                f"the original is the unpruned {model.arch} architecture with random weights "
                "(latency does not depend on the weights' values); give --original to time yours"
            )
    quantized = None
    if args.quantize:
        quantized = quantize_onnx(
            result.path,
            int8_path(result.path),
            args.quantize,
            data,
            calibration,
            # fidelity to the original only for one the user gave (not random-weight stand-ins)
            reference=original.module if args.original and original is not None else None,
            measure_latency=not args.no_latency,
            protected=protected,
            progress=TerminalProgress("quantizing"),
        )
    if args.json:
        summary = result.to_dict()
        if quantized is not None:
            summary.update(quantized.to_dict())
        print(json.dumps(summary))
        return 0
    _print_export(model.name, result)
    if quantized is not None:
        _print_quantized(quantized)
    return 0


def _print_export(name: str, result) -> None:  # result: ExportResult
    batch = "dynamic batch" if result.dynamic_batch else "fixed batch"
    opset = f", opset {result.opset}" if result.opset else ""
    print(f"exported {name} to {result.path} ({result.format}{opset}, {batch})")
    print(f"  parameters   {result.params:,} in the file, {result.params_model:,} in the model")
    sizes = " and ".join(str(b) for b in result.batch_sizes)
    print(f"  outputs      largest difference {result.max_abs_diff:.2g} (batch {sizes})")
    print(f"  size         {result.bytes:,} bytes")
    if result.input_names:
        print(f"  names        {', '.join(result.input_names)} -> {', '.join(result.output_names)}")
    if result.ort_ms_exported is not None:
        if result.ort_ms_original is not None:
            print(
                f"  ONNX Runtime {result.ort_ms_original:.3f} ms ({result.original_name}) -> "
                f"{result.ort_ms_exported:.3f} ms: {result.speedup:.2f}x (batch 1, median)"
            )
        else:
            print(f"  ONNX Runtime {result.ort_ms_exported:.3f} ms (batch 1, median)")
    if result.speed_line:
        print(f"  speed        {result.speed_line}")
    for extra in result.extra_files:
        print(f"  also wrote   {extra}")
    for note in result.notes:
        print(f"  note         {note}")


def _print_quantized(q) -> None:  # q: QuantizeResult
    calibration = f", {q.calibration_samples} calibration samples" if q.calibration_samples else ""
    print(f"INT8 ({q.mode}{calibration}): {q.path}")
    ratio = q.bytes_float / max(1, q.bytes_int8)
    print(f"  size         {q.bytes_float:,} -> {q.bytes_int8:,} bytes ({ratio:.1f}x smaller)")
    if q.accuracy_float is not None and q.accuracy_int8 is not None:
        print(
            f"  accuracy     {q.accuracy_float:.4f} -> {q.accuracy_int8:.4f} on {q.samples} samples"
        )
    if q.agreement_int8 is not None:
        print(f"  agreement    {q.agreement_int8:.2%} of top-1 predictions equal the float model's")
    if q.agreement_float_reference is not None and q.agreement_int8_reference is not None:
        print(
            f"  vs original  {q.agreement_float_reference:.2%} (float), "
            f"{q.agreement_int8_reference:.2%} (INT8) of top-1 predictions equal the original's"
        )
    if q.ort_ms_float is not None and q.ort_ms_int8 is not None:
        print(
            f"  ONNX Runtime {q.ort_ms_float:.3f} ms -> {q.ort_ms_int8:.3f} ms: "
            f"{q.speedup:.2f}x (batch 1, median)"
        )
    for note in q.notes:
        print(f"  note         {note}")
    sys.stdout.flush()
