"""Structural surgery on Hugging Face transformers: attention head groups, MLP neurons, layers.

Torch-Pruning's dependency graph does not see through a transformer's attention reshapes (the
heads are a ``view`` of a projection's output), so the coupled rows and columns are named here
per family instead (:mod:`studio.core.models.hf_arch`): removing a key/value group slices the
query rows of its heads, its key and value rows (with their biases) and the output projection's
input columns; removing MLP neurons slices the gate/up rows (or ``fc1``/``c_fc``) with the down
projection's columns. The attention modules' own counts are set to match, so the model runs as it
is; :func:`update_config` then makes its config say what it is, so that it saves and reloads
(see :mod:`studio.core.models.hf_arch` for which folders vanilla ``from_pretrained`` reloads).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from studio.core.errors import StudioError, first_line
from studio.core.models import hf_arch
from studio.core.models.hf_arch import STUDIO_LAYERS

# config field names per family: (heads, key/value heads, MLP width, explicit head size)
_FIELDS = {
    "llama": ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim"),
    "vit": ("num_attention_heads", None, "intermediate_size", "head_dim"),
    "bert": ("num_attention_heads", None, "intermediate_size", None),
    "gpt2": ("n_head", None, "n_inner", None),
}


def prune_heads(model: nn.Module, block: int, keep_groups: Sequence[int]) -> None:
    """Keep the key/value groups ``keep_groups`` of layer ``block`` (each: one key/value head
    and the query heads that read it; without grouped attention, one head)."""
    hf_arch.keep_head_groups(model, block, keep_groups)


def prune_mlp(model: nn.Module, block: int, keep: Sequence[int]) -> None:
    """Keep the MLP neurons ``keep`` of layer ``block``."""
    hf_arch.keep_neurons(model, block, keep)


def drop_layers(model: nn.Module, drop: Sequence[int]) -> None:
    """Remove the layers ``drop`` and renumber the rest (cache indices, per-layer config)."""
    name, layers = hf_arch.layer_list(model)
    n = len(layers)
    try:
        gone = sorted({int(i) for i in drop})
    except (TypeError, ValueError):
        raise StudioError("layers to drop must be given by their indices") from None
    if not gone:
        return
    if gone[0] < 0 or gone[-1] >= n:
        raise StudioError(f"{name} has {n} layers; cannot drop {gone}")
    if len(gone) == n:
        raise StudioError(f"cannot drop all {n} layers of {name}")
    kept = [i for i in range(n) if i not in set(gone)]
    for i in reversed(gone):
        del layers[i]  # ModuleList renumbers its keys; the list object stays the same
    for new, layer in enumerate(layers):
        for module in layer.modules():
            old = getattr(module, "layer_idx", None)
            if isinstance(old, int):
                if old != new and getattr(module, "scale_attn_by_inverse_layer_idx", False):
                    _move_inverse_layer_scaling(module, old, new)
                module.layer_idx = new  # the key/value cache slot it writes
    config = model.config
    for field in hf_arch.PER_LAYER_CONFIG:
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, field, [values[i] for i in kept])
    sizes = getattr(config, STUDIO_LAYERS, None)
    if isinstance(sizes, dict):
        setattr(
            config,
            STUDIO_LAYERS,
            {
                k: [v[i] for i in kept] if isinstance(v, list) and len(v) == n else v
                for k, v in sizes.items()
            },
        )
    config.num_hidden_layers = len(layers)  # Llama runs layers[: num_hidden_layers]


def _move_inverse_layer_scaling(attn: nn.Module, old: int, new: int) -> None:
    """GPT-2 may scale attention scores by 1/(layer + 1), fixed when the layer is built. A layer
    that moves to index ``new`` takes the new index's scaling (what a model rebuilt from the
    config computes) and its query projection makes up the difference, so the scores stay."""
    factor = (new + 1) / (old + 1)
    cross = getattr(attn, "is_cross_attention", False)
    proj = attn.q_attn if cross else attn.c_attn
    cols = slice(None) if cross else slice(0, attn.split_size)  # c_attn's columns: q | k | v
    with torch.no_grad():
        proj.weight[:, cols] *= factor  # Conv1D: (in, out)
        proj.bias[cols] *= factor
    attn.scaling = attn.scaling / factor


def _rows(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module stores."""
    w = module.weight.detach()
    return w if isinstance(module, nn.Linear) else w.t()


def head_scores(model: nn.Module, block: int) -> torch.Tensor:
    """One L2 weight norm per key/value group of layer ``block`` (its q, k, v rows and its
    output-projection columns): the choice when no data-based score is given."""
    layer, layout, b = hf_arch.layer_at(model, block)
    named = dict(model.named_modules())
    per, hd = b.heads // b.kv_heads, b.head_dim
    width = b.heads * hd
    if layout.qkv:
        qkv = _rows(named[f"{b.name}.{layout.qkv}"]).float()
        q, k, v = qkv[:width], qkv[width : 2 * width], qkv[2 * width :]
    else:
        q, k, v = (_rows(named[f"{b.name}.{p}"]).float() for p in (layout.q, layout.k, layout.v))
    out = _rows(named[b.out_proj]).float()  # (hidden, heads * head_dim)
    scores = torch.zeros(b.kv_heads)
    for g in range(b.kv_heads):
        qs = slice(g * per * hd, (g + 1) * per * hd)
        ks = slice(g * hd, (g + 1) * hd)
        total = q[qs].pow(2).sum() + k[ks].pow(2).sum() + v[ks].pow(2).sum()
        scores[g] = (total + out[:, qs].pow(2).sum()).sqrt()
    return scores


def neuron_scores(model: nn.Module, block: int) -> torch.Tensor:
    """One L2 weight norm per MLP neuron of layer ``block`` (its input rows, its down column)."""
    layer, layout, b = hf_arch.layer_at(model, block)
    total = torch.zeros(b.intermediate)
    for path in layout.mlp_in:
        total += _rows(hf_arch.submodule(layer, path)).float().pow(2).sum(dim=1)
    total += _rows(hf_arch.submodule(layer, layout.mlp_down)).float().pow(2).sum(dim=0)
    return total.sqrt()


# ---------------------------------------------------------------- config and files


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _builds_like(model: nn.Module, config, want: dict[str, tuple[int, ...]]) -> bool:
    """Whether ``config`` builds (and reshapes to) a model of ``want``'s shapes: the same
    layer weights, and the same shape for every other weight both have (a model built with
    other constructor arguments, e.g. without ViT's pooler, may have fewer)."""
    try:
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
        with torch.device("meta"):  # shapes only: nothing is allocated
            probe = type(model)(config)
            hf_arch.reshape_to_config(probe)
    except Exception:  # the config class or the model refuses these sizes
        return False
    got = _shapes(probe)
    prefix = hf_arch.layer_list(model)[0] + "."
    if {k for k in got if k.startswith(prefix)} != {k for k in want if k.startswith(prefix)}:
        return False
    return all(got[k] == shape for k, shape in want.items() if k in got)


def update_config(model: nn.Module) -> None:
    """Make ``model.config`` say what the model now is.

    Layer count, MLP width and head counts go into the standard fields (the largest value when
    layers differ). Where those fields cannot describe the model (sizes differ between layers;
    a family that derives the head size from ``hidden_size // heads``), the head fields keep a
    value that still gives the right head size and ``config.studio_layers`` lists the per-layer
    sizes, which :func:`studio.core.models.hf_arch.load_pretrained` applies on reload.
    """
    config = model.config
    fam = hf_arch.layout_of(model).family
    heads_field, kv_field, inner_field, head_dim_field = _FIELDS[fam]
    bl = hf_arch.blocks(model)
    sizes = hf_arch.per_layer_sizes(model)
    config.num_hidden_layers = len(bl)
    setattr(config, inner_field, max(sizes["intermediate"]))
    if head_dim_field:  # explicit, so that a head count no longer derives it
        setattr(config, head_dim_field, bl[0].head_dim)
    want = _shapes(model)
    proposals = [(max(sizes["heads"]), max(sizes["kv_heads"]))]
    proposals.append((getattr(config, heads_field), getattr(config, kv_field) if kv_field else 0))
    options = [(h, kv, None) for h, kv in proposals] + [(h, kv, sizes) for h, kv in proposals]
    for heads, kv, studio in options:
        candidate = copy.deepcopy(config)
        setattr(candidate, heads_field, heads)
        if kv_field:
            setattr(candidate, kv_field, kv)
        _set_studio(candidate, studio)
        if _builds_like(model, candidate, want):
            setattr(config, heads_field, heads)
            if kv_field:
                setattr(config, kv_field, kv)
            _set_studio(config, studio)
            return
    raise StudioError(
        f"cannot describe the pruned {config.model_type} in its config: rebuilding it from the "
        "config gives other shapes"
    )


def _set_studio(config, sizes: dict | None) -> None:
    if sizes is not None:
        setattr(config, STUDIO_LAYERS, copy.deepcopy(sizes))
    elif STUDIO_LAYERS in vars(config):
        delattr(config, STUDIO_LAYERS)


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    tokenizer=None,
    protected: tuple[Path, ...] = (),
) -> Path:
    """Save ``model`` (config updated first) and ``tokenizer`` as a transformers folder of
    safetensors weights, written beside ``directory`` and renamed into place: a failure
    leaves any earlier folder there as it was. ``protected`` are the folders the user opened:
    writing over one, or over a folder holding one, is refused."""
    target = Path(directory)
    resolved = target.resolve()
    for other in protected:
        if other is None:
            continue
        theirs = Path(other).resolve()
        if resolved == theirs or resolved in theirs.parents:
            raise StudioError(f"refusing to write over {target.name}: it holds an input file")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise StudioError(f"cannot write {target}: folder {parent} does not exist")
    if target.exists() and not target.is_dir():
        raise StudioError(f"cannot write the model folder {target}: a file of that name exists")
    update_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except OSError as exc:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the earlier folder back
        raise StudioError(f"cannot write {target}: {exc.strerror or first_line(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


__all__ = [
    "drop_layers",
    "head_scores",
    "neuron_scores",
    "prune_heads",
    "prune_mlp",
    "save_pretrained",
    "update_config",
]
