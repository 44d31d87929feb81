"""Opening the archives that carry their own graph: TorchScript (``torch.jit.save``) and
``torch.export`` programs (``.pt2``, whose pickled members are checked before any is
unpickled). :func:`studio.core.models.loaders.load_file` sends them here."""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from pathlib import Path

import torch

from studio.core.errors import TRUST_HINT, StudioError, UntrustedPickleError, first_line
from studio.core.models.loaded import (
    EXPORTED,
    TORCHSCRIPT,
    LoadedModel,
    check_runs,
    resolve_input_shape,
)


def load_torchscript(path: Path, input_shape: tuple[int, ...] | None) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError and more
        raise StudioError(
            f"{path.name} is a TorchScript archive that could not be loaded: {first_line(error)}"
        ) from None
    if input_shape is None:
        raise StudioError(
            f"{path.name} is a TorchScript module, which does not record its input shape: "
            "pass --input-shape (e.g. 1,3,224,224)"
        )
    loaded = LoadedModel(module.eval(), path.name, str(path), TORCHSCRIPT, input_shape, path=path)
    check_runs(loaded)
    return loaded


def load_exported(
    path: Path, input_shape: tuple[int, ...] | None, trust_pickle: bool
) -> LoadedModel:
    if not trust_pickle:
        member = _unsafe_pt2_member(path)
        if member is not None:
            raise UntrustedPickleError(
                f"{path.name} needs to run code from the file to load it (a pickled Python "
                f"object in {member}); {TRUST_HINT}"
            )
    try:
        program = torch.export.load(str(path))
    except Exception as error:  # torch raises many kinds here
        raise StudioError(
            f"{path.name} is a torch.export archive that could not be loaded: {first_line(error)}"
        ) from None
    user_inputs = program.graph_signature.user_inputs
    specs = [
        n.meta.get("val")
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in user_inputs
    ]
    if len(specs) != 1:
        raise StudioError(
            f"{path.name} takes {len(specs)} inputs; the studio supports models "
            "with a single input tensor"
        )
    dims = (
        None if specs[0] is None else [d if isinstance(d, int) else str(d) for d in specs[0].shape]
    )
    example = (getattr(program, "example_inputs", None) or ((), {}))[0]
    if input_shape is None and dims and len(example) == 1 and len(example[0].shape) == len(dims):
        # dynamic dims past the batch take their size from the example saved with the program
        dims[1:] = [
            d if isinstance(d, int) else int(e) for d, e in zip(dims[1:], example[0].shape[1:])
        ]
    shape = resolve_input_shape(dims, input_shape, f"{path.name}: input {user_inputs[0]!r}")
    module = program.module()
    # The exported graph fixed its train/eval behaviour at export time and torch makes
    # train()/eval() raise on it; restoring nn.Module's (flag-only) methods lets callers treat
    # it like any module.
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    loaded = LoadedModel(module, path.name, str(path), EXPORTED, shape, path=path)
    if dims is not None and isinstance(dims[0], int):
        loaded.notes.append(f"the exported program has a fixed batch size of {dims[0]}")
    check_runs(loaded)
    return loaded


def _unsafe_pt2_member(path: Path) -> str | None:
    """The first archive entry torch.export.load would unpickle with the full (code-running)
    unpickler that does not load with ``weights_only=True``, or None if there is none."""
    with zipfile.ZipFile(path) as archive:
        raw: set[str] = set()  # tensor payloads stored as plain bytes
        for name in archive.namelist():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(archive.read(name))["config"]
                except (ValueError, KeyError, TypeError):
                    return name
                folder = posixpath.dirname(name)
                raw |= {
                    posixpath.join(folder, entry["path_name"])
                    for entry in config.values()
                    if isinstance(entry, dict) and not entry.get("use_pickle")
                }
        for name in archive.namelist():
            # custom_obj_* are TorchScript objects, read by torch's own (code-free) unpickler
            if name in raw or posixpath.basename(name).startswith("custom_obj_"):
                continue
            data = archive.read(name)
            if data[:1] == b"\x80" or data[:2] == b"PK":  # a pickle or a torch.save zip
                try:
                    torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                except Exception:  # anything the safe loader refuses
                    return name
    return None
