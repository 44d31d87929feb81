"""Training checkpoints that load without trusting pickles.

A checkpoint is a ``torch.save`` dict of tensors and plain values only, read back with
``torch.load(weights_only=True)``. It holds the model's state_dict *and its shapes*: the plain
attributes of every layer (channel counts, features, groups) as
:mod:`studio.core.models.pruned_file` stores them. Resuming takes a copy of the job's student (the
same in-memory architecture), gives every layer the saved attributes and puts the saved
tensors in place whatever their shapes, so a model whose channels were removed by gradual
pruning after the student was given resumes too, at epoch granularity.

Two files live in the checkpoint folder: ``last.pt`` (written after every epoch: model,
optimizer, masks, history, counters) and ``best.pt`` (the best epoch's model). Both are written
atomically, so a crash leaves the previous file intact.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.models.pruned_file import apply_attributes, layer_attributes, place_tensors
from studio.core.train.types import FinetuneSettings

FORMAT_KEY = "studio_checkpoint"
FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"


def model_state(module: nn.Module) -> dict[str, Any]:
    """Shapes (plain layer attributes) and tensors of ``module``, copied to the CPU."""
    return {
        "attributes": {name: layer_attributes(mod) for name, mod in module.named_modules()},
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
    }


def restore_model(module: nn.Module, state: dict[str, Any], source: str) -> None:
    """Give ``module`` (a copy of the architecture the state was taken from) the saved
    attributes and tensors, in place, whatever the tensors' shapes."""
    try:
        attributes: dict = state["attributes"]
        tensors: dict = state["state_dict"]
    except (KeyError, TypeError):
        raise StudioError(f"{source} is a damaged checkpoint (no model state)") from None
    apply_attributes(module, attributes, f"{source} does not fit this model")
    expected = set(module.state_dict())
    if expected != set(tensors):
        odd = sorted(expected ^ set(tensors))[:3]
        raise StudioError(f"{source} does not fit this model: weights {odd} differ")
    place_tensors(module, {key: tensor.clone() for key, tensor in tensors.items()})


def save_checkpoint(folder: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors and plain values) as ``folder/name``, atomically."""
    buffer = io.BytesIO()
    torch.save({FORMAT_KEY: FORMAT_VERSION, **payload}, buffer)
    return write_atomic(folder / name, buffer.getvalue())


def load_checkpoint(folder: Path, name: str) -> dict[str, Any] | None:
    """The checkpoint ``folder/name``, or None if there is none."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudioError(f"cannot read checkpoint {path}: {first}"[:300]) from None
    if not isinstance(data, dict) or data.get(FORMAT_KEY) != FORMAT_VERSION:
        raise StudioError(f"{path} is not a training checkpoint of this studio")
    return data


def check_last(
    state: dict[str, Any],
    folder: Path,
    fingerprint: str,
    settings: FinetuneSettings,
    gradual: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], int]:
    """Refuse a last checkpoint of another model, other settings (but those a continued run
    may change) or another gradual schedule; return its history records and epochs done."""
    try:
        if state["fingerprint"] != fingerprint:
            raise StudioError(
                f"the checkpoint in {folder} is of another model: give that model, or "
                "another checkpoint folder"
            )
        changed = settings.differences(state["settings"])
        if changed:
            raise StudioError(
                f"the checkpoint in {folder} was made with other settings "
                f"({', '.join(changed)}): use the same settings or another folder"
            )
        if state["gradual"] != gradual:
            raise StudioError(
                f"the checkpoint in {folder} was made with another gradual-pruning schedule"
            )
        return list(state["history"]), int(state["epoch"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StudioError(f"the checkpoint in {folder} is damaged ({exc})") from None


def load_best(folder: Path, epoch: int) -> dict[str, Any] | None:
    """The best checkpoint the last one names (``epoch``; 0 = none yet)."""
    if not epoch:
        return None
    best = load_checkpoint(folder, BEST)
    if best is None or int(best["epoch"]) != epoch:
        raise StudioError(f"the best checkpoint in {folder} is missing or older than the last")
    return {"epoch": epoch, "metrics": best["metrics"], "model": best["model"]}


def prepare_folder(folder: Path) -> Path:
    """Create the checkpoint folder if needed (its parent must exist)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"checkpoint folder {folder} is a file")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise StudioError(
                f"cannot create checkpoint folder {folder}: no folder {folder.parent}"
            )
        folder.mkdir()
    return folder
