"""Checks an exported file must pass: its outputs match the model's, its parameters are the
model's.

Outputs are compared on the same inputs; the largest absolute difference over every output must
be at most ``TOLERANCE`` times ``max(1, largest output magnitude)``: 1e-4 for outputs of
ordinary size (logits, probabilities), relative for the outputs in the thousands that deep
networks with random weights produce, where float32 rounding alone reaches 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from studio.core.errors import StudioError, first_line

TOLERANCE = 1e-4
_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]


class BatchShapeError(StudioError):
    """The exported file fails, or gives other shapes, on a batch: its batch size is fixed."""


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


def torch_outputs(module: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``module`` on ``x`` as float arrays (tuples and lists flattened)."""
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    items = list(out) if isinstance(out, tuple | list) else [out]
    if not all(isinstance(i, torch.Tensor) for i in items):
        raise StudioError("the model's output is not a tensor or a tuple of tensors")
    return [i.detach().cpu().numpy() for i in items]


def max_abs_diff(
    expected: RunFn, got: RunFn, batches: Sequence[np.ndarray], what: str
) -> tuple[float, float]:
    """The largest absolute difference between two runtimes over ``batches``, and the largest
    output magnitude; a StudioError when shapes differ or a runtime fails."""
    worst, scale = 0.0, 0.0
    for x in batches:
        want = expected(x)
        try:
            have = got(x)
        except Exception as error:  # the exported program fails on this batch
            raise BatchShapeError(
                f"the exported {what} fails on an input of shape {x.shape}: {first_line(error)}"
            ) from None
        if len(have) != len(want):
            raise StudioError(
                f"the exported {what} gives {len(have)} outputs where the model gives {len(want)}"
            )
        for a, b in zip(want, have, strict=True):
            b = np.asarray(b)
            if a.shape != b.shape:
                raise BatchShapeError(
                    f"the exported {what} gives an output of shape {b.shape} where the model "
                    f"gives {a.shape}"
                )
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            diff = np.abs(a64 - b64)
            diff[np.isnan(a64) & np.isnan(b64)] = 0.0
            worst = max(worst, float(np.max(np.nan_to_num(diff, nan=np.inf), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(np.nan_to_num(a64)), initial=0.0)))
    return worst, scale


def require_match(diff: float, scale: float, what: str) -> None:
    """Fail loudly when ``diff`` is beyond the tolerance (see the module docstring)."""
    allowed = TOLERANCE * max(1.0, scale)
    if not diff <= allowed:
        raise StudioError(
            f"the exported {what} does not reproduce the model: largest difference {diff:.3g} "
            f"(allowed {allowed:.2g}); nothing was written"
        )


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
