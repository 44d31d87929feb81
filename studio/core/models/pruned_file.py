"""Saving a pruned model so that it loads back without running code from the file.

Three formats, chosen by the file's extension:

- ``.pt`` / ``.pth``: a ``torch.save`` dict that ``torch.load(weights_only=True)`` reads: the
  built-in architecture's name and input shape, the blocks replaced by their shortcut, the plain
  attributes of every layer (channel counts, groups, features) and the state_dict. Loading
  rebuilds the architecture from the zoo, replays the block removals, gives every layer its
  saved attributes and tensors, and checks that it runs. The result is an ordinary eager model:
  it can be inspected, evaluated, pruned again and fine-tuned. Only models built from the zoo
  (the demo, ``zoo:NAME``, a state_dict loaded with ``--arch``) can be saved this way.
- ``.pt2``: a ``torch.export`` program with a dynamic batch size, for any model (ONNX imports
  too); it loads for evaluation and latency measurement only.
- ``.onnx``: an ONNX file, for any model. A model imported from ONNX is written as its file
  declared it: the same input and output names, dynamic dims and opset (the nearest one torch's
  exporter writes, with a note, if it cannot write that one); any other model with inputs and
  outputs named ``input`` and ``output``, a dynamic batch and the default opset. The file is run
  in ONNX Runtime beside the module on seeded inputs, at a second size of every dynamic dim too,
  and written only if its outputs match (:func:`studio.core.models.onnx_io.verified_onnx`, the
  check ``studio export`` makes).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.models import onnx_io, zoo
from studio.core.models.blocks import remove_block, removed_blocks
from studio.core.models.loaded import EAGER, LoadedModel

FORMAT_KEY = "studio_pruned_model"
FORMAT_VERSION = 1
PT_SUFFIXES = (".pt", ".pth")
SUFFIXES = (*PT_SUFFIXES, ".pt2", ".onnx")
_PLAIN = (int, float, bool, str, type(None))


def save_model(
    model: LoadedModel,
    path: str | Path,
    protected: tuple[Path, ...] = (),
    notes: list[str] | None = None,
) -> Path:
    """Write ``model`` to ``path`` (.pt: rebuildable eager model; .pt2: torch.export; .onnx:
    ONNX, checked in ONNX Runtime). What the user should know about the file (an opset other
    than the original's) is appended to ``notes``."""
    path = Path(path)
    check_destination(model, path)
    suffix = path.suffix.lower()
    if suffix in PT_SUFFIXES:
        payload = _rebuildable(model, path)
    elif suffix == ".onnx":
        payload = _onnx(model, notes if notes is not None else [])
    else:
        payload = _exported(model)
    return write_atomic(path, payload, protected)


def check_destination(model: LoadedModel, path: str | Path) -> None:
    """Refuse, before any work, a file ``model`` (or its pruned copy) cannot be saved as."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StudioError(
            f"a pruned model is saved as .pt, .pt2 or .onnx, not {suffix or path.name}"
        )
    if suffix in PT_SUFFIXES and (model.kind != EAGER or model.arch not in zoo.NAMES):
        raise StudioError(
            f"{model.name} is not a built-in architecture, so a .pt file could not rebuild it "
            f"without running code: save it as {path.with_suffix('.pt2').name} (torch.export)"
        )


def _rebuildable(model: LoadedModel, path: Path) -> bytes:
    check_destination(model, path)
    module = model.module
    payload = {
        FORMAT_KEY: FORMAT_VERSION,
        "arch": model.arch,
        "input_shape": list(model.input_shape),
        "name": model.name,
        "removed_blocks": removed_blocks(module),
        "attributes": {name: layer_attributes(mod) for name, mod in module.named_modules()},
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def layer_attributes(mod: nn.Module) -> dict[str, Any]:
    """The plain public attributes of a layer: sizes, groups, flags (no tensors, no code)."""
    return {
        k: v
        for k, v in vars(mod).items()
        if not k.startswith("_")
        and (
            isinstance(v, _PLAIN)
            or (isinstance(v, (tuple, list)) and all(isinstance(i, _PLAIN) for i in v))
        )
    }


def _exported(model: LoadedModel) -> bytes:
    module = model.module.eval()
    example = model.example_input(2)  # batch 2, so the batch dimension is not specialised
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception:  # some graphs fix their batch size: export it as it is
        try:
            program = torch.export.export(module, (model.example_input(),))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise StudioError(
                f"{model.name} could not be exported with torch.export: {type(exc).__name__}: "
                f"{first}"[:300]
            ) from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _onnx(model: LoadedModel, notes: list[str]) -> bytes:
    """``model`` as a checked ONNX file that declares what its own ONNX file did."""
    inputs, outputs = onnx_io.file_names(model)
    axes = onnx_io.file_axes(model, inputs, outputs)
    opset, note = onnx_io.supported_opset(model.onnx_opset)
    input_axes = axes.get(inputs[0], {})
    x = model.example_input(2 if 0 in input_axes else model.input_shape[0]).numpy()
    checks = [x, *onnx_io.probe_inputs(x, input_axes)]
    module = model.module.eval()
    try:
        data, *_ = onnx_io.verified_onnx(
            module, torch.from_numpy(x), checks, opset, inputs, outputs, axes, "ONNX file"
        )
    except onnx_io.BatchShapeError as error:  # a dim declared dynamic that is not
        raise StudioError(f"{error}; nothing was written") from None
    if note:
        notes.append(note)
    return data


def is_pruned_file(obj: Any) -> bool:
    """Whether ``obj`` (what torch.load returned) is a file written by :func:`save_model`."""
    return isinstance(obj, dict) and FORMAT_KEY in obj


def load_pruned(obj: dict, path: Path, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Rebuild the model saved in ``obj`` (read from ``path`` with weights_only=True)."""
    version = obj.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise StudioError(
            f"{path.name} is a pruned model of format {version}; this studio reads {FORMAT_VERSION}"
        )
    try:
        arch = str(obj["arch"])
        shape = tuple(input_shape or (int(d) for d in obj["input_shape"]))
        blocks = [str(b) for b in obj["removed_blocks"]]
        attributes: dict = obj["attributes"]
        state: dict = obj["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StudioError(f"{path.name} is a damaged pruned model file ({exc})") from None
    if arch not in zoo.NAMES:
        raise StudioError(f"{path.name} needs architecture {arch!r}, which this studio lacks")
    module = zoo.build(arch, input_shape=shape)
    for name in blocks:
        remove_block(module, name)
    apply_attributes(module, attributes, f"{path.name} does not fit {arch}")
    _load_tensors(module, state, path, arch)
    loaded = LoadedModel(
        module.eval(),
        f"{path.name} ({arch}, pruned)",
        str(path),
        EAGER,
        shape,
        arch=arch,
        path=path,
    )
    try:
        with torch.no_grad():
            module(loaded.example_input())
    except Exception as exc:  # the file's shapes and architecture disagree
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudioError(f"{path.name} does not run as a pruned {arch}: {first}"[:300]) from None
    return loaded


def _load_tensors(module: nn.Module, state: dict, path: Path, arch: str) -> None:
    """Put the file's tensors in place, whatever their shapes (the layers were resized)."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise StudioError(f"{path.name} does not fit {arch}: {what} weights")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise StudioError(f"{path.name}: {key} is not a tensor")
    place_tensors(module, state)


def apply_attributes(module: nn.Module, attributes: dict, misfit: str) -> None:
    """Give each named layer its saved plain attributes (sizes after pruning); ``misfit``
    starts the error when the module has no such layer."""
    mods = dict(module.named_modules())
    for name, attrs in attributes.items():
        mod = mods.get(name)
        if mod is None:
            raise StudioError(f"{misfit}: it has no layer {name!r}")
        for key, value in attrs.items():
            if key in vars(mod):
                setattr(mod, key, value)


def place_tensors(module: nn.Module, tensors: dict) -> None:
    """Put tensors in place by state_dict key, whatever their shapes (the layers were
    resized); parameters keep their requires_grad."""
    for key, tensor in tensors.items():
        owner, _, attr = key.rpartition(".")
        mod = module.get_submodule(owner)
        if attr in mod._parameters:
            old = mod._parameters[attr]
            grad = old.requires_grad if old is not None else True
            mod._parameters[attr] = nn.Parameter(tensor, requires_grad=grad)
        else:
            mod._buffers[attr] = tensor
