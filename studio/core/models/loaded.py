"""What a loaded model is: :class:`LoadedModel` (the module in eval mode plus what the rest of
the studio needs to know about it: input shape, what kind of file it came from, which
operations the kind does not support, and for ONNX imports the names, opset and dynamic axes
the file declared), and input shapes (parsed, or resolved against a file's
recorded dimensions). Loading itself is :mod:`studio.core.models.load`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from studio.core.errors import StudioError, first_line

# kinds of loaded model, and the operations each cannot do
EAGER, TORCHSCRIPT, EXPORTED, ONNX = "eager", "torchscript", "exported", "onnx"
HUGGINGFACE = "huggingface"  # a transformers model from a local folder (studio.core.models.hf)
UNSUPPORTED: dict[str, dict[str, str]] = {
    EAGER: {},
    HUGGINGFACE: {},
    ONNX: {},
    TORCHSCRIPT: {
        "structural pruning": "a TorchScript module has a frozen graph that cannot be re-traced "
        "after channels are removed; load the eager model (state_dict + --arch) to prune it",
        "fine-tuning": "TorchScript modules are loaded for evaluation and latency only",
    },
    EXPORTED: {
        "structural pruning": "a torch.export program has fixed tensor shapes baked into its "
        "graph; load the eager model (state_dict + --arch) to prune it",
        "fine-tuning": "torch.export programs are loaded for evaluation and latency only",
    },
}


@dataclass
class LoadedModel:
    """A model ready for evaluation, inspection and (for eager/ONNX kinds) pruning."""

    module: torch.nn.Module
    name: str
    spec: str
    kind: str
    input_shape: tuple[int, ...]  # including a batch dimension of 1
    arch: str | None = None
    path: Path | None = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)  # shown to the user on load
    onnx_max_diff: float | None = None  # ONNX: converted graph vs onnxruntime
    # ONNX imports: what the file declared, so that an ONNX file written back declares the same:
    # its ai.onnx opset, and per input/output name its dynamic dims (index -> symbolic name)
    onnx_opset: int | None = None
    onnx_dynamic_axes: dict[str, dict[int, str]] | None = None
    # Hugging Face models: token ids in (vocab_size), what comes out (task: causal-lm,
    # embedding, classifier, vision) and the folder's tokenizer
    vocab_size: int | None = None
    task: str | None = None
    tokenizer: Any = None

    @property
    def unsupported(self) -> dict[str, str]:
        """Operations this kind of model cannot do, with the reason."""
        return UNSUPPORTED[self.kind]

    def require(self, operation: str) -> None:
        """Raise a clear error if ``operation`` is not supported for this kind of model."""
        reason = self.unsupported.get(operation)
        if reason:
            raise StudioError(f"{operation} is not supported for {self.name}: {reason}")

    @property
    def file_size(self) -> int | None:
        return self.path.stat().st_size if self.path is not None and self.path.exists() else None

    def replica(self) -> LoadedModel:
        """The same model with its own copy of the module.

        Inspection and scans register hooks and trace the module they are given; two jobs
        doing so on one module at once would see each other's forward passes. The GUI gives
        each such job a replica made on its own thread before the job starts.
        """
        return replace(self, module=copy.deepcopy(self.module), notes=list(self.notes))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        shape = (batch, *self.input_shape[1:])
        generator = torch.Generator().manual_seed(0)
        if self.vocab_size:  # token ids
            return torch.randint(0, self.vocab_size, shape, generator=generator)
        return torch.randn(*shape, generator=generator)

    @property
    def is_text(self) -> bool:
        return self.vocab_size is not None

    def fingerprint(self) -> str:
        """Hash of architecture and weights, used to key caches and to tie plans to a model."""
        h = hashlib.sha256(self.kind.encode())
        h.update(str(self.input_shape).encode())
        for key, tensor in self.module.state_dict().items():
            h.update(key.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(
                tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
        return h.hexdigest()[:16]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """Parse ``1,3,48,192`` (commas or x) into a tuple of positive ints."""
    if text is None or text == "":
        return None
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        raise StudioError(f"bad input shape {text!r}: expected integers like 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise StudioError(f"bad input shape {text!r}: every dimension must be a positive integer")
    return shape


def resolve_input_shape(
    dims: Sequence[int | str | None] | None, given: tuple[int, ...] | None, what: str
) -> tuple[int, ...]:
    """The input shape to use: fixed dims from the file, dynamic ones (a name or None) from
    ``given``. A dynamic batch (first) dim defaults to 1; any other needs ``given``."""
    if dims is None:
        if given is None:
            raise StudioError(f"{what} has no recorded shape; pass --input-shape (e.g. 1,3,32,32)")
        return given
    shown = "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in dims) + "]"
    if given is not None:
        if len(given) != len(dims) or any(
            isinstance(d, int) and d != g for d, g in zip(dims, given, strict=False)
        ):
            raise StudioError(
                f"{what} has shape {shown}; --input-shape {shape_text(given)} contradicts it"
            )
        return given
    if any(not isinstance(d, int) for d in dims[1:]):
        hint = ",".join(
            "1" if i == 0 and not isinstance(d, int) else str(d or "?") for i, d in enumerate(dims)
        )
        raise StudioError(f"{what} has dynamic dimensions {shown}; pass --input-shape {hint}")
    return tuple(d if isinstance(d, int) else 1 for d in dims)


def shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(d) for d in shape)


def check_runs(loaded: LoadedModel) -> None:
    """Run one example so a wrong input shape fails here, with a clear message."""
    try:
        with torch.no_grad():
            loaded.module(loaded.example_input())
    except Exception as error:  # any failure means the shape does not fit
        raise StudioError(
            f"{loaded.name} does not run on an input of shape {shape_text(loaded.input_shape)}: "
            f"{first_line(error)}; pass the right --input-shape"
        ) from None
