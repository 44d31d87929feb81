"""Checks an exported file must pass: its outputs match the model's, its parameters are the
model's.

The output check (:func:`max_abs_diff`, :func:`require_match`, ``TOLERANCE``) lives with the
ONNX writer in :mod:`studio.core.models.onnx_io`, whose docstring gives the tolerance: saving a
pruned model as ONNX (:mod:`studio.core.models.pruned_file`, a lower stage than this one) checks
its file the same way. It is imported here for the exporter's other formats.
"""

from __future__ import annotations

from torch import nn

from studio.core.errors import StudioError
from studio.core.models.onnx_io import (
    TOLERANCE,
    BatchShapeError,
    RunFn,
    max_abs_diff,
    require_match,
    torch_outputs,
)

__all__ = [
    "TOLERANCE",
    "BatchShapeError",
    "RunFn",
    "max_abs_diff",
    "module_params",
    "require_match",
    "require_params",
    "torch_outputs",
    "zero_fraction",
]
_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def module_params(module: nn.Module) -> int:
    """Elements of a module's floating-point parameters and buffers, as a file stores them.

    Batch-norm running statistics are left out (they are statistics, not parameters), and so
    are single-element tensors (constants such as fill values, which exporters turn into node
    attributes). Buffers count because converted ONNX models keep some weights as buffers.
    """
    total = 0
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in tensors:
        if name.rsplit(".", 1)[-1] in _BN_STATISTICS or not tensor.is_floating_point():
            continue
        if tensor.numel() > 1:
            total += tensor.numel()
    return total


def require_params(in_file: int, in_model: int, what: str) -> None:
    if in_file != in_model:
        raise StudioError(
            f"the exported {what} holds {in_file:,} parameters but the model has {in_model:,}; "
            "nothing was written"
        )


def zero_fraction(module: nn.Module) -> float:
    """Fraction of exact zeros in the weights (2-D or more), as unstructured pruning leaves."""
    weights = [p for n, p in module.named_parameters() if n.rsplit(".", 1)[-1].startswith("weight")]
    weights = [w for w in weights if w.dim() >= 2]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0
