"""What a Hugging Face transformer's blocks are, how to resize them, and how to reload a pruned one.

Structural pruning of a transformer cuts whole attention heads and whole MLP neurons. Which
rows and columns belong together depends on the family's module layout, so each supported layout
is described once here (:class:`_Layout`) and found by looking at the modules, not only at
``config.model_type`` (a fine-tuned RoBERTa or a YOLOS has BERT's layout under another name):

- ``bert``: ``encoder.layer[i].attention.self.query/key/value`` (ViT-likes in the old layout, e.g.
  YOLOS or VideoMAE: ``attention.attention.*``), ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``. BERT, RoBERTa, ELECTRA and the like. ``family`` says ``vit`` for an image model.
- ``gpt2``: ``transformer.h[i].attn.c_attn`` (fused q|k|v ``Conv1D``, weight ``(in, out)``),
  ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``.
- ``llama``: ``model.layers[i].self_attn.q_proj/k_proj/v_proj/o_proj`` with grouped key/value
  heads (query head ``h`` reads key/value head ``h // (heads / kv_heads)``), optional q/k/v
  biases (Qwen2), ``mlp.gate_proj/up_proj/down_proj``. Llama, Mistral, Qwen2 and their kin.
- ``vit``: transformers 5 rewrote ViT as ``layers[i].attention.q_proj/k_proj/v_proj/o_proj`` and
  ``mlp.fc1/fc2`` (its ``save_pretrained`` still writes the old BERT-style key names).

The unit of head pruning is a key/value group: one key/value head and the query heads that read it
(without grouped attention, one head). Slicing keeps the order of what stays.

Reloading a pruned model. ``update_config`` (in :mod:`studio.core.prune.transformer`) writes the
pruned sizes into the standard config fields when the family can express them; otherwise it adds
``config.studio_layers = {"heads": [...], "kv_heads": [...], "intermediate": [...]}``. Vanilla
``from_pretrained`` reloads a pruned folder exactly when the config has no ``studio_layers``,
which is the case when every layer has the same sizes AND:

- llama family: always for MLP and layer removal; for heads when the config class accepts the new
  head count (``head_dim`` is written explicitly; Llama's config also insists that
  ``hidden_size % num_attention_heads == 0``, Qwen2's and Mistral's do not);
- vit (transformers 5 layout): heads too (``head_dim`` is read from the config when present);
- bert (with the old-layout ViT-likes) and gpt2: MLP neurons and layer removal only. Their
  attention computes the head size as ``hidden_size // num_attention_heads``, so a config with
  fewer heads would describe bigger heads, not fewer: ``num_attention_heads`` keeps the original
  count there and the real head counts go into ``studio_layers``.

(GPT-2 with ``scale_attn_by_inverse_layer_idx`` keeps reloading after a layer is dropped: the
layers that move take their new index's scaling and fold the difference into their queries.)
Everything else (layers of different sizes, the cases above) reloads only through
:func:`load_pretrained`, which builds the model from its config, shrinks each layer to the listed
sizes (:func:`reshape_to_config`) and then lets transformers load the safetensors into it, with
every weight of the layers required to be there. Vanilla ``from_pretrained`` on such a folder
fails on the mismatched shapes rather than loading a different model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from studio.core.errors import StudioError, first_line

STUDIO_LAYERS = "studio_layers"  # the config attribute holding per-layer sizes
# config lists with one entry per layer: filtered when layers are dropped
PER_LAYER_CONFIG = ("layer_types", "mlp_layer_types", "no_rope_layers")
# attention attributes the forward passes (or generation) read, set after heads are removed
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
_WIDTH_ATTRS = ("all_head_size", "split_size")


@dataclass(frozen=True)
class Block:
    """One transformer layer as the pruner sees it (module names are from ``named_modules()``)."""

    index: int
    name: str  # the layer module, e.g. "model.layers.3"
    attention: str  # the attention module, e.g. "model.layers.3.self_attn"
    mlp: str  # the MLP module (BERT-style layouts: the layer's ``intermediate``)
    heads: int  # query heads now
    kv_heads: int  # key/value heads now (== heads without grouped attention)
    head_dim: int
    intermediate: int  # MLP neurons now
    out_proj: str  # its INPUT features (last dim) are the concatenated heads
    mlp_down: str  # its INPUT features (last dim) are the MLP neurons


@dataclass(frozen=True)
class _Layout:
    """Where one family keeps its parts, relative to a layer module."""

    family: str
    attention: str  # the attention module reported in Block.attention
    core: str  # the module that holds the head attributes (head_dim, num_heads, ...)
    head_dim_attr: str
    q: str | None  # separate projections, or None when ``qkv`` is fused
    k: str | None
    v: str | None
    qkv: str | None  # GPT-2's fused Conv1D: output columns are [q | k | v]
    out: str
    mlp: str
    mlp_in: tuple[str, ...]  # projections whose outputs are the neurons
    mlp_down: str

    def required(self) -> tuple[str, ...]:
        projections = (self.qkv,) if self.qkv else (self.q, self.k, self.v)
        return (*projections, self.out, *self.mlp_in, self.mlp_down)  # type: ignore[return-value]


def _bert(attn: str) -> _Layout:
    core = f"attention.{attn}"
    return _Layout(
        "bert",
        "attention",
        core,
        "attention_head_size",
        f"{core}.query",
        f"{core}.key",
        f"{core}.value",
        None,
        "attention.output.dense",
        "intermediate",
        ("intermediate.dense",),
        "output.dense",
    )


_LAYOUTS = (
    _Layout(
        "llama",
        "self_attn",
        "self_attn",
        "head_dim",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        None,
        "self_attn.o_proj",
        "mlp",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
    ),
    _Layout(
        "gpt2",
        "attn",
        "attn",
        "head_dim",
        None,
        None,
        None,
        "attn.c_attn",
        "attn.c_proj",
        "mlp",
        ("mlp.c_fc",),
        "mlp.c_proj",
    ),
    _Layout(
        "vit",
        "attention",
        "attention",
        "head_dim",
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        None,
        "attention.o_proj",
        "mlp",
        ("mlp.fc1",),
        "mlp.fc2",
    ),
    _bert("self"),
    _bert("attention"),
)


# ---------------------------------------------------------------- finding the layers


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (a Linear with its weight stored as (in, out)), known without importing
    transformers, which costs a second at start-up for models that are not transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def submodule(module: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted ``path`` below ``module``, or None."""
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if not isinstance(module, nn.Module):
            return None
    return module


def _matches(layer: nn.Module, layout: _Layout) -> bool:
    for path in layout.required():
        part = submodule(layer, path)
        if not (isinstance(part, nn.Linear) or _is_conv1d(part)):
            return False
    core = submodule(layer, layout.core)
    return core is not None and isinstance(getattr(core, layout.head_dim_attr, None), int)


def _find(model: nn.Module) -> tuple[str, nn.ModuleList, _Layout]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            layout = next((lay for lay in _LAYOUTS if _matches(module[0], lay)), None)
            if layout is not None and all(_matches(m, layout) for m in module):
                found.append((name, module, layout))
    if not found:
        raise StudioError(
            f"cannot prune {_model_type(model)} structurally: its layers are not of a BERT, "
            "GPT-2, Llama or ViT form"
        )
    if len(found) > 1:
        names = ", ".join(name for name, _, _ in found)
        raise StudioError(
            f"{_model_type(model)} has several stacks of layers ({names}); structural pruning "
            "handles models with one"
        )
    return found[0]


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ``ModuleList`` holding the transformer layers."""
    name, layers, _ = _find(model)
    return name, layers


def family(model: nn.Module) -> str:
    """``"bert"``, ``"gpt2"``, ``"llama"`` or ``"vit"`` (BERT-layout image models say ``vit``)."""
    layout = _find(model)[2]
    if layout.family == "bert" and getattr(model, "main_input_name", "") == "pixel_values":
        return "vit"
    return layout.family


def layout_of(model: nn.Module) -> _Layout:
    """The module layout of ``model``'s layers (for the surgery in the prune stage)."""
    return _find(model)[2]


def _layer_name(prefix: str, i: int) -> str:
    return f"{prefix}.{i}" if prefix else str(i)


def _out_features(module: nn.Module) -> int:
    return int(module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0])


def _block(prefix: str, i: int, layer: nn.Module, layout: _Layout) -> Block:
    core = submodule(layer, layout.core)
    head_dim = int(getattr(core, layout.head_dim_attr))
    if layout.qkv:
        width = _out_features(submodule(layer, layout.qkv)) // 3
        heads = kv_heads = width // head_dim
    else:
        heads = _out_features(submodule(layer, layout.q)) // head_dim
        kv_heads = _out_features(submodule(layer, layout.k)) // head_dim
    name = _layer_name(prefix, i)
    return Block(
        index=i,
        name=name,
        attention=f"{name}.{layout.attention}",
        mlp=f"{name}.{layout.mlp}",
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=_out_features(submodule(layer, layout.mlp_in[0])),
        out_proj=f"{name}.{layout.out}",
        mlp_down=f"{name}.{layout.mlp_down}",
    )


def blocks(model: nn.Module) -> list[Block]:
    """Every layer of ``model`` (a transformers model with any head) with its sizes now."""
    prefix, layers, layout = _find(model)
    return [_block(prefix, i, layer, layout) for i, layer in enumerate(layers)]


def head_groups(block: Block) -> int:
    """How many units head pruning chooses from in ``block``: its key/value groups."""
    return block.kv_heads


# ---------------------------------------------------------------- resizing


def _slice_out(module: nn.Module, index: torch.Tensor) -> None:
    """Keep the output features ``index`` of a Linear or Conv1D (rows and bias)."""
    dim = 1 if _is_conv1d(module) else 0
    weight = module.weight
    module.weight = nn.Parameter(
        weight.detach().index_select(dim, index.to(weight.device)),
        requires_grad=weight.requires_grad,
    )
    if getattr(module, "bias", None) is not None:
        bias = module.bias
        module.bias = nn.Parameter(
            bias.detach().index_select(0, index.to(bias.device)), requires_grad=bias.requires_grad
        )
    if _is_conv1d(module):
        module.nf = len(index)
    else:
        module.out_features = len(index)


def _slice_in(module: nn.Module, index: torch.Tensor) -> None:
    """Keep the input features ``index`` of a Linear or Conv1D (columns; the bias stays)."""
    dim = 0 if _is_conv1d(module) else 1
    weight = module.weight
    module.weight = nn.Parameter(
        weight.detach().index_select(dim, index.to(weight.device)),
        requires_grad=weight.requires_grad,
    )
    if _is_conv1d(module):
        module.nx = len(index)
    else:
        module.in_features = len(index)


def _units(heads: Sequence[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    """The feature indices of ``heads`` (each ``head_dim`` wide) after ``offset``."""
    idx = [offset + h * head_dim + d for h in heads for d in range(head_dim)]
    return torch.tensor(idx, dtype=torch.long)


def _checked(keep: Sequence[int], count: int, what: str, where: str) -> list[int]:
    try:
        chosen = sorted(int(k) for k in keep)
    except (TypeError, ValueError):
        raise StudioError(f"{what} to keep in {where} must be whole numbers") from None
    if len(set(chosen)) != len(chosen):
        raise StudioError(f"{what} to keep in {where} are listed twice: {chosen}")
    if chosen and (chosen[0] < 0 or chosen[-1] >= count):
        raise StudioError(f"{where} has {count} {what}; cannot keep {chosen}")
    return chosen


def layer_at(model: nn.Module, index: int) -> tuple[nn.Module, _Layout, Block]:
    """Layer ``index`` of ``model``: the module, its layout and its Block."""
    prefix, layers, layout = _find(model)
    if not 0 <= int(index) < len(layers):
        raise StudioError(f"{_model_type(model)} has {len(layers)} layers; no layer {index}")
    layer = layers[int(index)]
    return layer, layout, _block(prefix, int(index), layer, layout)


def keep_head_groups(model: nn.Module, index: int, keep_groups: Sequence[int]) -> Block:
    """Keep the key/value groups ``keep_groups`` of layer ``index``; return its new Block."""
    layer, layout, block = layer_at(model, index)
    keep = _checked(keep_groups, block.kv_heads, "head groups", block.name)
    if not keep:
        raise StudioError(
            f"cannot keep 0 head groups in {block.name}: remove the whole layer instead"
        )
    if len(keep) == block.kv_heads:
        return block
    per = block.heads // block.kv_heads
    q_heads = [g * per + i for g in keep for i in range(per)]
    hd = block.head_dim
    if layout.qkv:
        width = block.heads * hd
        cols = torch.cat([_units(q_heads, hd, offset) for offset in (0, width, 2 * width)])
        _slice_out(submodule(layer, layout.qkv), cols)
    else:
        _slice_out(submodule(layer, layout.q), _units(q_heads, hd))
        _slice_out(submodule(layer, layout.k), _units(keep, hd))
        _slice_out(submodule(layer, layout.v), _units(keep, hd))
    _slice_in(submodule(layer, layout.out), _units(q_heads, hd))
    _set_head_attrs(submodule(layer, layout.core), len(q_heads), len(keep), hd)
    return _block(layer_list(model)[0], block.index, layer, layout)


def _set_head_attrs(core: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Make the attention module's own counts say what its projections now hold."""
    for name in _HEAD_COUNT_ATTRS:
        if isinstance(getattr(core, name, None), int):
            setattr(core, name, heads)
    for name in _KV_COUNT_ATTRS:
        if isinstance(getattr(core, name, None), int):
            setattr(core, name, kv_heads)
    for name in _WIDTH_ATTRS:  # GPT-2's embed_dim is the residual width: it stays
        if isinstance(getattr(core, name, None), int):
            setattr(core, name, heads * head_dim)
    # num_key_value_groups (heads per kv head) does not change: whole groups go


def keep_neurons(model: nn.Module, index: int, keep: Sequence[int]) -> Block:
    """Keep the MLP neurons ``keep`` of layer ``index``; return its new Block."""
    layer, layout, block = layer_at(model, index)
    chosen = _checked(keep, block.intermediate, "MLP neurons", block.name)
    if not chosen:
        raise StudioError(
            f"cannot keep 0 MLP neurons in {block.name}: remove the whole layer instead"
        )
    if len(chosen) == block.intermediate:
        return block
    idx = torch.tensor(chosen, dtype=torch.long)
    for path in layout.mlp_in:
        _slice_out(submodule(layer, path), idx)
    _slice_in(submodule(layer, layout.mlp_down), idx)
    return _block(layer_list(model)[0], block.index, layer, layout)


# ---------------------------------------------------------------- reloading


def per_layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """``{"heads", "kv_heads", "intermediate"}``: one entry per layer, as the model is now."""
    bl = blocks(model)
    return {
        "heads": [b.heads for b in bl],
        "kv_heads": [b.kv_heads for b in bl],
        "intermediate": [b.intermediate for b in bl],
    }


def reshape_to_config(model: nn.Module) -> None:
    """Shrink the layers of a freshly built ``model`` to the sizes in ``config.studio_layers``.

    The kept rows are the first ones: the weights are about to be replaced by a pruned model's
    state dict, which then loads with every shape matching. Without ``studio_layers`` this does
    nothing.
    """
    sizes = getattr(model.config, STUDIO_LAYERS, None)
    if not sizes:
        return
    prefix, layers, layout = _find(model)
    n = len(layers)
    lists = {key: sizes.get(key) for key in ("heads", "kv_heads", "intermediate")}
    for key, values in lists.items():
        if not isinstance(values, list) or len(values) != n:
            raise StudioError(
                f"config.{STUDIO_LAYERS}['{key}'] must list {n} sizes, one per layer; "
                f"it is {values!r}"
            )
    for i, layer in enumerate(layers):
        block = _block(prefix, i, layer, layout)
        heads, kv, inner = (int(lists[k][i]) for k in ("heads", "kv_heads", "intermediate"))
        if kv > block.kv_heads or inner > block.intermediate or heads > block.heads:
            raise StudioError(
                f"config.{STUDIO_LAYERS} gives {block.name} more heads or neurons than the "
                "config's standard fields allow"
            )
        if heads * block.kv_heads != kv * block.heads:
            raise StudioError(
                f"config.{STUDIO_LAYERS} gives {block.name} {heads} heads for {kv} key/value "
                f"heads; the model has {block.heads // block.kv_heads} per key/value head"
            )
        if kv < block.kv_heads:
            keep_head_groups(model, i, range(kv))
        if inner < block.intermediate:
            keep_neurons(model, i, range(inner))


def _post_init_reshaped(self: nn.Module) -> None:
    reshape_to_config(self)
    super(type(self), self).post_init()


def _concrete_class(config, model_class):
    import transformers

    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            model_class = transformers.AutoModel
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an Auto class: the concrete class for this config
        try:
            model_class = mapping[type(config)]
        except KeyError:
            raise StudioError(
                f"{model_class.__name__} cannot build a {config.model_type} model"
            ) from None
    return model_class


def load_pretrained(
    directory: str | Path,
    model_class=None,
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a (pruned or not) transformers folder of safetensors weights.

    A config without ``studio_layers`` goes through vanilla ``from_pretrained``. One with it is
    built from the config, shrunk by :func:`reshape_to_config` and loaded by the same machinery
    (key renames, tied weights, shards), strictly: a missing weight of a layer is an error, not
    a freshly initialised tensor. Either way a weight of another shape is an error (transformers
    raises).

    ``model_class`` is a concrete class (``LlamaForCausalLM``) or an Auto class; by default the
    config's ``architectures``. Folder code (``auto_map``) is never run and pickled weights never
    read here, whatever ``trust_remote_code`` says (accepted for the caller's signature).
    """
    del trust_remote_code  # never passed on: see the docstring
    import transformers

    folder = Path(directory)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise StudioError(f"{folder} has no config.json: not a transformers folder")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StudioError(f"cannot read {config_file}: {first_line(exc)}") from None
    if raw.get("auto_map"):
        raise StudioError(
            f"{folder.name} brings its own modelling code (auto_map); structural loading runs "
            "only the code that ships with transformers"
        )
    if not any(folder.glob("*.safetensors")):
        raise StudioError(f"{folder.name} has no *.safetensors weights")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # unknown model_type, bad values
        raise StudioError(f"cannot read the config in {folder.name}: {first_line(exc)}") from None
    base = _concrete_class(config, model_class)
    cls = base
    if getattr(config, STUDIO_LAYERS, None):
        # the same class, but its layers are shrunk before the weights are loaded into it
        # (in the same module: transformers treats classes from elsewhere as custom code and
        # would skip the key renames, e.g. ViT's old checkpoint names)
        namespace = {"post_init": _post_init_reshaped, "__module__": base.__module__}
        cls = type(base.__name__, (base,), namespace)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, info = cls.from_pretrained(
        folder,
        config=config,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        output_loading_info=True,
        **kwargs,
    )
    if cls is not base:
        model.__class__ = base  # nothing of the helper class stays
    # a pruned folder: no weight of a reshaped layer may be left to chance (elsewhere, as in
    # transformers: a ViTModel saved without its pooler gets a new one)
    prefix = layer_list(model)[0] + "." if cls is not base else None
    missing = sorted(k for k in info.get("missing_keys") or [] if prefix and k.startswith(prefix))
    if missing:
        raise StudioError(
            f"the weights in {folder.name} do not fit its config ({len(missing)} missing, "
            f"e.g. {missing[0]})"
        )
    return model


__all__ = [
    "Block",
    "blocks",
    "family",
    "head_groups",
    "keep_head_groups",
    "keep_neurons",
    "layer_at",
    "layer_list",
    "layout_of",
    "load_pretrained",
    "per_layer_sizes",
    "reshape_to_config",
    "submodule",
]
