"""Loading models from a spec: ``demo``, ``zoo:NAME``, or a file (PyTorch, TorchScript, .pt2, ONNX).

Every loader returns a :class:`~studio.core.models.loaded.LoadedModel`. The file the user gave
is only ever read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.core.errors import StudioError
from studio.core.jobs import ProgressFn
from studio.core.models import loaders, zoo
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.paths import DEMO_WEIGHTS


def load_model(
    spec: str,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    num_classes: int = 10,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Load the model named by ``spec`` (``demo``, ``zoo:NAME`` or a path), in eval mode;
    ``progress`` hears of each step of loading (an ONNX file's conversion and checks)."""
    if spec == "demo":
        return load_demo()
    if spec.startswith("zoo:"):
        name = spec[4:]
        shape = input_shape or zoo.default_input_shape(name)
        module = zoo.build(name, input_shape=shape, num_classes=num_classes)
        return LoadedModel(module.eval(), f"{name} (random weights)", spec, EAGER, shape, arch=name)
    return loaders.load_file(
        Path(spec),
        arch=arch,
        input_shape=input_shape,
        trust_pickle=trust_pickle,
        num_classes=num_classes,
        progress=progress,
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
