"""Loading models from a spec: ``demo``, ``zoo:NAME``, or a file (PyTorch, TorchScript, .pt2, ONNX).

Every loader returns a :class:`LoadedModel`: the module in eval mode plus what the rest of the
studio needs to know about it (input shape, what kind of file it came from, which operations
the kind does not support). The file the user gave is only ever read.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from studio.core import zoo
from studio.core.errors import StudioError
from studio.core.paths import DEMO_WEIGHTS

# kinds of loaded model, and the operations each cannot do
EAGER, TORCHSCRIPT, EXPORTED, ONNX = "eager", "torchscript", "exported", "onnx"
UNSUPPORTED: dict[str, dict[str, str]] = {
    EAGER: {},
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
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0))

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


def load_model(
    spec: str,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    num_classes: int = 10,
) -> LoadedModel:
    """Load the model named by ``spec`` (``demo``, ``zoo:NAME`` or a path), in eval mode."""
    if spec == "demo":
        return load_demo()
    if spec.startswith("zoo:"):
        name = spec[4:]
        shape = input_shape or zoo.default_input_shape(name)
        module = zoo.build(name, input_shape=shape, num_classes=num_classes)
        return LoadedModel(module.eval(), f"{name} (random weights)", spec, EAGER, shape, arch=name)
    from studio.core import loaders

    return loaders.load_file(
        Path(spec),
        arch=arch,
        input_shape=input_shape,
        trust_pickle=trust_pickle,
        num_classes=num_classes,
    )


def load_demo() -> LoadedModel:
    """The bundled ResNet-20 trained on the digits demo set."""
    if not DEMO_WEIGHTS.exists():
        raise StudioError(f"demo weights missing: {DEMO_WEIGHTS} (run packaging/train_demo.py)")
    shape = zoo.default_input_shape("resnet20")
    module = zoo.build("resnet20", input_shape=shape, num_classes=10)
    state = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return LoadedModel(
        module.eval(),
        "demo ResNet-20 (digits)",
        "demo",
        EAGER,
        shape,
        arch="resnet20",
        path=DEMO_WEIGHTS,
    )
