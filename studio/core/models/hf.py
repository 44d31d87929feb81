"""Hugging Face models from a local folder: ``config.json`` plus safetensors weights, and the
folder's tokenizer when it has one.

Covered: BERT-family encoders (a sentence-transformers folder, with ``modules.json`` and a
pooling config, gives its pooled embedding), GPT-2, Llama/Qwen2-style decoders (grouped-query
attention, RoPE) and ViT. The transformers model is wrapped in :class:`HFModule`, a plain
``nn.Module`` whose forward takes one tensor (token ids, or pixels for ViT) and returns one:
next-token logits (B, T, vocab) for a causal LM, the logits of a classification head, or the
pooled embedding (B, hidden) for an encoder. The rest of the studio sees one input and one
output, as it does for a CNN.

Safety: weights are read from safetensors only; a folder with only pickled weights
(``pytorch_model.bin``) or with its own modelling code (``auto_map``) is refused unless the
user trusts it (``--trust-pickle``, the same rule as pickled model files). Nothing is ever
fetched from a hub: the hub is switched off for the process, and a model name that is not a
local folder gets a one-line error saying so.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio.core.errors import StudioError, first_line
from studio.core.jobs import ProgressFn, report
from studio.core.models.loaded import HUGGINGFACE, LoadedModel
from studio.core.models.text import DEFAULT_SEQ_LEN

# never reach a hub, whatever the user's environment says
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CAUSAL_LM, EMBEDDING, CLASSIFIER, VISION = "causal-lm", "embedding", "classifier", "vision"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class HFModule(nn.Module):
    """One tensor in, one tensor out, around a transformers model (kept as ``.hf``)."""

    def __init__(
        self,
        hf: nn.Module,
        task: str,
        pooling: str = "mean",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.studio_task = task
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.studio_task == VISION:
            out = self.hf(pixel_values=x)
            logits = getattr(out, "logits", None)
            if logits is not None:
                return logits
            return _pool(out.last_hidden_state, "cls")
        if self.studio_task == CAUSAL_LM:
            return self.hf(input_ids=x, use_cache=False).logits
        out = self.hf(input_ids=x)
        logits = getattr(out, "logits", None)
        if self.studio_task == CLASSIFIER and logits is not None:
            return logits
        embedding = _pool(out.last_hidden_state, self.pooling)
        return nn.functional.normalize(embedding, dim=-1) if self.normalize else embedding


def _pool(hidden: torch.Tensor, mode: str) -> torch.Tensor:
    """The sequences the studio feeds are whole windows (no padding), so every token counts."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.max(dim=1).values
    return hidden.mean(dim=1)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def not_local(spec: str) -> StudioError | None:
    """The error for a spec that names no local file or folder but looks like a hub id."""
    if Path(spec).exists() or not _HUB_ID.match(spec) or Path(spec).suffix in (".pt", ".onnx"):
        return None
    return StudioError(
        f"{spec} is not a local folder: the studio never downloads from a model hub; "
        f"download it first (e.g. `hf download {spec} --local-dir DIR`) and pass --model DIR"
    )


def load_hf(
    folder: Path,
    trust: bool = False,
    seq_len: int = DEFAULT_SEQ_LEN,
    input_shape: tuple[int, ...] | None = None,
    progress: ProgressFn | None = None,
    name: str | None = None,
) -> LoadedModel:
    """Load the Hugging Face model in ``folder`` (read only) in eval mode, in float32."""
    folder = Path(folder)
    report(progress, 0.0, "reading config.json")
    modules_json = folder / "modules.json"
    pooling, normalize, root = "mean", False, folder
    if modules_json.is_file():  # sentence-transformers: transformer, pooling, normalize
        root, pooling, normalize = _sentence_transformer(folder, modules_json)
    config = _read_json(root / "config.json")
    _check_weights(root, trust)
    if config.get("auto_map") and not trust:
        raise StudioError(
            f"{folder.name} brings its own modelling code (auto_map in config.json); the studio "
            "runs it only for a folder you trust: pass --trust-pickle"
        )
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    arch = (config.get("architectures") or [None])[0]
    model_type = str(config.get("model_type") or "?")
    task, cls = _task_and_class(transformers, arch, model_type, modules_json.is_file())
    report(progress, 0.2, f"loading {arch or model_type} weights")
    from studio.core.models import hf_arch

    trusted_path = trust and (config.get("auto_map") or not list(root.glob("*.safetensors")))
    try:
        if trusted_path:  # the folder's own code or pickled weights, as the user allowed
            hf = cls.from_pretrained(str(root), dtype=torch.float32, trust_remote_code=True)
        else:
            hf = hf_arch.load_pretrained(root, cls, torch.float32)
    except StudioError:
        raise
    except Exception as exc:  # transformers' own errors: missing keys, bad shapes, versions
        raise StudioError(
            f"cannot load {folder.name} with transformers: {first_line(exc)}"
        ) from None
    hf.eval()
    report(progress, 0.8, "loading the tokenizer")
    tokenizer = load_tokenizer(root if _has_tokenizer(root) else folder, trust)
    module = HFModule(hf, task, pooling, normalize).eval()
    cfg = hf.config
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or None
    if task == VISION:
        size = int(getattr(cfg, "image_size", 224))
        channels = int(getattr(cfg, "num_channels", 3))
        shape = input_shape or (1, channels, size, size)
        vocab = None
    else:
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        length = seq_len if input_shape is None else int(input_shape[-1])
        if limit and length > int(limit):
            raise StudioError(
                f"--seq-len {length} is longer than {folder.name} allows ({limit} positions)"
            )
        shape = (1, length)
    notes = []
    if tokenizer is None and task != VISION:
        notes.append("no tokenizer in the folder: text data cannot be read for this model")
    loaded = LoadedModel(
        module,
        name or f"{folder.name} ({arch or model_type})",
        str(folder),
        HUGGINGFACE,
        tuple(shape),
        arch=model_type,
        path=folder,
        input_names=("pixel_values",) if task == VISION else ("input_ids",),
        output_names=("logits",)
        if task in (CAUSAL_LM, CLASSIFIER) or _has_logits(arch)
        else ("embedding",),
        notes=notes,
        vocab_size=vocab,
        task=task,
        tokenizer=tokenizer,
    )
    report(progress, 1.0, "loaded")
    return loaded


def _has_logits(arch: str | None) -> bool:
    """A vision model with a classification head outputs logits, not an embedding."""
    return bool(arch) and "Classification" in str(arch)


def load_tokenizer(folder: Path, trust: bool = False) -> Any:
    if not _has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    except Exception as exc:  # a damaged or unsupported tokenizer: the model still loads
        raise StudioError(
            f"cannot load the tokenizer in {folder.name}: {first_line(exc)}"
        ) from None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise StudioError(f"{path.parent.name} has no {path.name}: not a Hugging Face model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudioError(f"cannot read {path.parent.name}/{path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise StudioError(f"{path.parent.name}/{path.name} is not a JSON object")
    return data


def _check_weights(folder: Path, trust: bool) -> None:
    if list(folder.glob("*.safetensors")):
        return
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled and not trust:
        raise StudioError(
            f"{folder.name} holds only pickled weights ({pickled[0]}), which can run code when "
            "loaded: convert them to safetensors, or pass --trust-pickle for a folder you trust"
        )
    if not pickled:
        raise StudioError(f"{folder.name} has no weights (no *.safetensors file)")


def _sentence_transformer(folder: Path, modules_json: Path) -> tuple[Path, str, bool]:
    """(folder of the transformer, pooling mode, normalize) from sentence-transformers files."""
    try:
        modules = json.loads(modules_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StudioError(f"cannot read {folder.name}/modules.json: {exc}") from None
    root, pooling, normalize = folder, "mean", False
    for entry in modules if isinstance(modules, list) else []:
        kind = str(entry.get("type", ""))
        path = folder / str(entry.get("path", ""))
        if kind.endswith("Transformer"):
            root = path
        elif kind.endswith("Pooling"):
            cfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif cfg.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
            other = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            unknown = set(other) - {
                "pooling_mode_cls_token",
                "pooling_mode_max_tokens",
                "pooling_mode_mean_tokens",
            }
            if unknown:
                raise StudioError(f"{folder.name}: unsupported pooling {sorted(unknown)[0]}")
        elif kind.endswith("Normalize"):
            normalize = True
        elif kind:
            raise StudioError(f"{folder.name}: unsupported sentence-transformers module {kind}")
    return root, pooling, normalize


def _task_and_class(transformers: Any, arch: str | None, model_type: str, sentence: bool):
    """What the model's output is, and the transformers class that builds it."""
    cls = getattr(transformers, arch, None) if arch else None
    if model_type == "vit":
        return VISION, cls or transformers.ViTModel
    if sentence:
        return EMBEDDING, transformers.AutoModel
    if arch and cls is None:
        raise StudioError(
            f"transformers {transformers.__version__} has no class {arch} (model_type "
            f"{model_type}); a folder with its own code needs --trust-pickle"
        )
    if arch and (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
        return CAUSAL_LM, cls
    if arch and (arch.endswith("ForSequenceClassification") or "Classification" in arch):
        return CLASSIFIER, cls
    if arch and arch.endswith("Model"):
        return EMBEDDING, cls
    # a pre-training head (masked LM and the like): the encoder's pooled embedding
    return EMBEDDING, transformers.AutoModel
