"""Opening a model file: tell its format from its content, load it, describe it as a LoadedModel.

Formats: ONNX (see :mod:`studio.core.models.onnx_import`), ``torch.save`` files (zip or legacy
pickle)
holding a state_dict or a whole module, TorchScript archives and ``torch.export`` ``.pt2``
archives. Pickles are read with ``weights_only=True``; one that needs to run code from the file
raises :class:`UntrustedPickleError` unless the user said they trust it. The file is only read.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.core.errors import (
    ANSI_CODES,
    TRUST_HINT,
    StudioError,
    UntrustedPickleError,
    first_line,
)
from studio.core.jobs import ProgressFn
from studio.core.models import zoo
from studio.core.models.archives import load_exported, load_torchscript
from studio.core.models.loaded import (
    EAGER,
    LoadedModel,
    check_runs,
)

TORCH_SAVE, TORCH_LEGACY, TORCHSCRIPT_ZIP, EXPORT_ZIP, ONNX_FILE = (
    "torch.save zip",
    "legacy torch.save pickle",
    "TorchScript",
    "torch.export",
    "ONNX",
)
_NOT_A_MODEL = "not a PyTorch, TorchScript or ONNX file"
# torch.save's legacy (non-zip) format starts by pickling this number (as a LONG1)
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# keys under which training scripts commonly nest the weights in a checkpoint dict
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def load_file(
    path: Path,
    arch: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    num_classes: int = 10,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Load the model in ``path``, whatever its extension says, in eval mode."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == ONNX_FILE:
        from studio.core.models.onnx_import import load_onnx

        return load_onnx(path, input_shape, progress)
    if fmt == TORCHSCRIPT_ZIP:
        return load_torchscript(path, input_shape)
    if fmt == EXPORT_ZIP:
        return load_exported(path, input_shape, trust_pickle)
    obj = _torch_load(path, trust_pickle)
    from studio.core.models import pruned_file  # a pruned model saved by the studio (.pt)

    if pruned_file.is_pruned_file(obj):
        return pruned_file.load_pruned(obj, path, input_shape)
    state = _find_state_dict(obj)
    if isinstance(state, nn.Module):
        return _from_module(state, path, input_shape)
    if state is not None:
        return _from_state_dict(state, path, arch, input_shape, num_classes)
    raise StudioError(f"{path.name} holds {_describe(obj)}, not a model or a state_dict")


def sniff_format(path: Path) -> str:
    """The format of ``path`` judged from its bytes, or a StudioError saying what it is not."""
    if not path.exists():
        raise StudioError(f"{path} does not exist")
    if path.is_dir():
        raise StudioError(f"{path.name} is a folder, not a model file")
    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        raise StudioError(f"{path.name} is empty (0 bytes), {_NOT_A_MODEL}")
    if zipfile.is_zipfile(path):
        return _zip_format(path)
    if head.startswith(b"PK\x03\x04"):
        raise StudioError(
            f"{path.name} is a damaged or truncated zip archive (a torch.save, TorchScript or "
            ".pt2 file cut short?)"
        )
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        if _LEGACY_MAGIC in head[:32]:
            return TORCH_LEGACY
        raise StudioError(f"{path.name} is a Python pickle, not a file written by torch.save")
    text = _leading_text(head)
    if text is not None:
        raise StudioError(f"{path.name} is {_NOT_A_MODEL} (it starts with text: {text!r})")
    if head.startswith(b"\x89HDF"):
        raise StudioError(
            f"{path.name} is an HDF5 file (a Keras model?): convert it to ONNX and open the .onnx"
        )
    # an ONNX ModelProto starts with field 1 (ir_version) as a varint: byte 0x08
    if head[0] == 0x08 or path.suffix.lower() == ".onnx":
        return ONNX_FILE
    raise StudioError(f"{path.name} is {_NOT_A_MODEL} (it starts with bytes {head[:8].hex(' ')})")


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise StudioError(f"{path.name} is a damaged zip archive: {first_line(error)}") from None
    # torch writes every entry under one top folder named after the file
    inner = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in inner or "serialized_exported_program.json" in inner:
        return EXPORT_ZIP
    if "data.pkl" in inner and (
        "constants.pkl" in inner or any(n.startswith("code/") for n in inner)
    ):
        return TORCHSCRIPT_ZIP
    if "data.pkl" in inner:
        return TORCH_SAVE
    listed = ", ".join(sorted(names)[:3])
    raise StudioError(f"{path.name} is a zip archive but {_NOT_A_MODEL} (it holds {listed})")


def _leading_text(head: bytes) -> str | None:
    """The first characters of ``head`` if it reads as text, else None."""
    sample = head[:200]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(sample) - 3:  # not just a character cut at the end of the sample
            return None
        text = sample[: error.start].decode("utf-8")
    if not text or not text.replace("\n", "").replace("\r", "").replace("\t", "").isprintable():
        return None
    return text[:30].strip() + ("..." if len(text) > 30 else "")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise _damaged(path, error) from None
        if not trust_pickle:
            raise UntrustedPickleError(f"{path.name} {_refusal(error)}; {TRUST_HINT}") from None
    except Exception as error:  # torch.load raises many kinds on damaged files
        raise _damaged(path, error) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise StudioError(
            f"{path.name} needs Python code that is not importable here ({first_line(error)}); "
            "save the model's state_dict instead and load it with --arch"
        ) from None
    except Exception as error:  # arbitrary code from the file ran and failed
        raise StudioError(f"{path.name} could not be unpickled: {first_line(error)}") from None


def _damaged(path: Path, error: BaseException) -> StudioError:
    return StudioError(
        f"{path.name} is a damaged or truncated torch.save file "
        f"({type(error).__name__}: {first_line(error)})"
    )


def _refusal(error: BaseException) -> str:
    """Why torch's safe unpickler refused the file: the Python name the pickle imports when torch
    names one, otherwise its reason (junk after torch's header lands here too)."""
    text = ANSI_CODES.sub("", str(error)).split("Check the documentation")[0]
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"needs to run code from the file to load it (a pickled Python object: {match[1]})"
    reason = text.strip().splitlines()[-1].strip()
    reason = "" if reason.endswith("error:") else reason
    return (
        "cannot be read without running code from it (the safe loader stopped"
        f"{': ' + reason if reason else ''}); it may be damaged"
    )


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | nn.Module | None:
    """A whole module, or a mapping of names to tensors, in ``obj`` or nested one level down."""
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    for key in _CHECKPOINT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module | Mapping):
            found = _find_state_dict(inner)
            if found is not None:
                return found
    return None


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _from_state_dict(
    state: dict[str, torch.Tensor],
    path: Path,
    arch: str | None,
    input_shape: tuple[int, ...] | None,
    num_classes: int,
) -> LoadedModel:
    if arch is None:
        raise StudioError(
            f"{path.name} is a state_dict (weights without the architecture): pass --arch NAME "
            f"(one of {', '.join(zoo.NAMES)})"
        )
    shape = input_shape or zoo.default_input_shape(arch)
    module = zoo.build(arch, input_shape=shape, num_classes=num_classes)
    expected = module.state_dict()
    notes = []
    prefix = "module."  # left by nn.DataParallel / DistributedDataParallel
    if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
        state = {k[len(prefix) :]: v for k, v in state.items()}
        notes.append("removed the 'module.' prefix that DataParallel left on the weight names")
    problem = _state_dict_mismatch(expected, state)
    if problem:
        raise StudioError(f"{path.name} does not fit {arch}: {problem}")
    module.load_state_dict(state, strict=True)
    return LoadedModel(
        module.eval(),
        f"{path.name} ({arch})",
        str(path),
        EAGER,
        tuple(shape),
        arch=arch,
        path=path,
        notes=notes,
    )


def _state_dict_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any]) -> str:
    """What differs between two state_dicts, first few of each kind, in one line ('' if none)."""
    shapes = [
        f"{k} is {tuple(found[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    groups = (
        ("missing keys", [k for k in expected if k not in found]),
        ("unexpected keys", [k for k in found if k not in expected]),
        ("different shapes", shapes),
    )
    parts = [f"{label}: {_first_few(items)}" for label, items in groups if items]
    if shapes:
        parts.append("check --num-classes and --input-shape against how it was trained")
    return "; ".join(parts)


def _first_few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _from_module(module: nn.Module, path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    shape = input_shape or _zoo_input_shape(module)
    if shape is None:
        raise StudioError(
            f"{path.name} holds a whole {type(module).__name__} module, which does not record "
            "its input shape: pass --input-shape (e.g. 1,3,224,224)"
        )
    loaded = LoadedModel(
        module.eval(),
        path.name,
        str(path),
        EAGER,
        tuple(shape),
        path=path,
        notes=["loaded a whole pickled module (the file's pickle code ran, as you allowed)"],
    )
    check_runs(loaded)
    return loaded


def _zoo_input_shape(module: nn.Module) -> tuple[int, ...] | None:
    """Zoo architectures are built for 32x32 inputs; the channels come from the first conv."""
    if type(module).__module__ != zoo.__name__:
        return None
    batch, channels, height, width = zoo.default_input_shape(zoo.NAMES[0])  # same for all
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return (batch, conv.in_channels if conv else channels, height, width)
