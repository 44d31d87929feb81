"""Loading models from a spec: ``demo``, ``zoo:NAME``, or a file (PyTorch, TorchScript, .pt2, ONNX).

Every loader returns a :class:`~studio.core.models.loaded.LoadedModel`. The file the user gave
is only ever read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.core.errors import StudioError
from studio.core.jobs import ProgressFn
from studio.core.models import hf, loaders, zoo
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.paths import DEMO_LM_DIR, DEMO_WEIGHTS


def is_folder_spec(spec: str) -> bool:
    """Whether ``spec`` names a model folder (a Hugging Face transformer): ``demo-lm`` or a
    directory."""
    return spec == "demo-lm" or Path(spec).is_dir()


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
    if is_folder_spec(spec):
        return _load_folder(spec, input_shape, trust_pickle, progress)
    if spec.startswith("zoo:"):
        name = spec[4:]
        shape = input_shape or zoo.default_input_shape(name)
        module = zoo.build(name, input_shape=shape, num_classes=num_classes)
        return LoadedModel(module.eval(), f"{name} (random weights)", spec, EAGER, shape, arch=name)
    missing = hf.not_local(spec) if not Path(spec).exists() else None
    if missing is not None:
        raise missing
    return loaders.load_file(
        Path(spec),
        arch=arch,
        input_shape=input_shape,
        trust_pickle=trust_pickle,
        num_classes=num_classes,
        progress=progress,
    )


def _load_folder(
    spec: str,
    input_shape: tuple[int, ...] | None,
    trust: bool,
    progress: ProgressFn | None,
) -> LoadedModel:
    """A Hugging Face model folder (``demo-lm``: the bundled Llama-style demo)."""
    folder = DEMO_LM_DIR if spec == "demo-lm" else Path(spec)
    if spec == "demo-lm" and not (folder / "config.json").is_file():
        raise StudioError(f"demo LM missing: {folder} (run packaging/train_demo_lm.py)")
    if not hf.is_hf_folder(folder):
        raise StudioError(
            f"{folder} is a folder without config.json: a Hugging Face model folder holds "
            "config.json and *.safetensors"
        )
    loaded = hf.load_hf(
        folder,
        trust=trust,
        input_shape=input_shape,
        progress=progress,
        name="demo LM (Llama-style, GQA)" if spec == "demo-lm" else None,
    )
    if spec == "demo-lm":
        loaded.spec = "demo-lm"
    return loaded


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
