"""``studio info`` (the layer inventory) and ``studio eval`` (accuracy and loss, or fidelity to
a reference model)."""

from __future__ import annotations

import argparse
import json

from studio.cli.common import (
    TerminalProgress,
    add_data_args,
    add_model_args,
    load_data_arg,
    load_model_arg,
)


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="layer inventory: shapes, parameters, MACs, groups")
    add_model_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="accuracy and loss, or fidelity to a reference model")
    add_model_args(ev)
    add_data_args(ev)
    ev.add_argument("--reference", metavar="SPEC", help="reference model for fidelity")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_info(args: argparse.Namespace) -> int:
    from studio.core.models.inventory import build_inventory

    model = load_model_arg(args)
    inventory = build_inventory(model, progress=TerminalProgress("inspecting"))
    if args.json:
        print(json.dumps(inventory.to_dict()))
        return 0
    print(f"{inventory.model_name}  [{model.kind}]  input {inventory.input_shape}")
    print(
        f"{'layer':<32} {'type':<18} {'output':<18} {'params':>10} {'MACs':>12} "
        f"{'sparsity':>8}  group / reason"
    )
    for layer in inventory.layers:
        shape = "x".join(str(d) for d in layer.output_shape) if layer.output_shape else "?"
        where = f"G{layer.group}" if layer.group is not None else layer.reason
        print(
            f"{layer.name:<32} {layer.type:<18} {shape:<18} {layer.params:>10,} "
            f"{layer.macs:>12,} {layer.sparsity:>8.1%}  {where}"
        )
    print(
        f"total: {inventory.params:,} parameters, {inventory.macs:,} MACs, "
        f"{len(inventory.groups)} dependency groups, sparsity {inventory.sparsity:.1%}"
    )
    if inventory.graph_error:
        print(f"structural pruning unavailable: {inventory.graph_error}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from studio.core.models.evaluate import evaluate

    model = load_model_arg(args)
    data = load_data_arg(args)
    reference = load_model_arg(args, args.reference).module if args.reference else None
    result = evaluate(
        model.module,
        data,
        reference=reference,
        batch_size=args.batch_size,
        progress=TerminalProgress("evaluating"),
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{model.name} on {data.name} ({result.samples} samples)")
    for key, value in result.to_dict().items():
        if value is not None and key != "samples":
            print(f"  {key:<9} {value:.4f}")
    return 0
