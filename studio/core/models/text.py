"""Text data for language models: a ``.txt`` file or a ``.jsonl`` file with a ``text`` field,
tokenized with the model's tokenizer into sequences of ``seq_len`` tokens.

The split into calibration and validation is fixed and does not depend on the tokenizer: the
last :data:`VAL_FRACTION` of the text, cut at a line boundary, is validation
(:func:`split_text`). ``packaging/train_demo_lm.py`` trains the demo LM on the first part only,
so the demo's validation perplexity is measured on text it never saw.

Tokenized sequences are cached under the studio's cache folder, keyed by the text's hash, the
tokenizer's hash and the sequence length, as scans are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.core.errors import StudioError
from studio.core.files import write_atomic
from studio.core.models.data import DataSet
from studio.core.paths import cache_dir

DEFAULT_SEQ_LEN = 128
VAL_FRACTION = 0.1
TEXT_SUFFIXES = (".txt", ".jsonl", ".md")
CACHE_VERSION = 1


def read_text(path: Path) -> str:
    """The text of a ``.txt``/``.md`` file, or the ``text`` fields of a ``.jsonl`` file joined
    by blank lines; one-line errors for anything else."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise StudioError(
            f"unsupported text file {path.name}: use .txt or .jsonl with a 'text' field"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StudioError(
            f"{path.name} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    except OSError as exc:
        raise StudioError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    if suffix != ".jsonl":
        text = raw
    else:
        parts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StudioError(f"{path.name} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise StudioError(f"{path.name} line {number} has no 'text' string field")
            parts.append(record["text"])
        text = "\n\n".join(parts)
    if not text.strip():
        raise StudioError(f"{path.name} holds no text")
    return text


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(calibration, validation): validation is the last ``val_fraction`` of the characters,
    moved forward to the next line start so that no line is cut."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    cut = newline + 1 if newline >= 0 else cut
    return text[:cut], text[cut:]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what the tokenizer does (its serialized vocabulary and rules)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        h.update(json.dumps(sorted(vocab.items())).encode())
    return h.hexdigest()[:16]


def tokenize(text: str, tokenizer: Any, chunk_chars: int = 100_000) -> np.ndarray:
    """The token ids of ``text`` as one stream (no special tokens), in chunks at line
    boundaries so that a long corpus does not go to the tokenizer in one piece."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            newline = text.find("\n", end)
            end = newline + 1 if newline >= 0 else len(text)
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return np.asarray(ids, dtype=np.int64)


def sequences(ids: np.ndarray, seq_len: int, prefix: list[int] | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens (the tail shorter than one is dropped);
    ``prefix`` (a [CLS] or BOS id) starts each window."""
    prefix = list(prefix or [])
    body = seq_len - len(prefix)
    if body <= 0:
        raise StudioError(f"--seq-len {seq_len} is too short")
    n = len(ids) // body
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.int64)
    rows = ids[: n * body].reshape(n, body)
    if prefix:
        rows = np.concatenate([np.tile(np.asarray(prefix, np.int64), (n, 1)), rows], axis=1)
    return torch.from_numpy(np.ascontiguousarray(rows))


@dataclass(frozen=True)
class TextSplits:
    calibration: DataSet
    validation: DataSet


def load_text_data(
    path: str | Path,
    tokenizer: Any,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_sequences: int | None = None,
    name: str | None = None,
    use_cache: bool = True,
) -> TextSplits:
    """Tokenize a text file into (calibration, validation) sets of token-id sequences.

    ``x`` holds int64 ids of shape (N, seq_len); ``y`` is None (quality is perplexity or
    fidelity to the unpruned model, never labels)."""
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"text data not found: {path}")
    if tokenizer is None:
        raise StudioError("the model has no tokenizer: text data needs one in the model folder")
    if not 8 <= seq_len <= 8192:
        raise StudioError(f"--seq-len must be between 8 and 8192, not {seq_len}")
    text = read_text(path)
    prefix = _prefix(tokenizer)
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{text_sha256(text)}|{tokenizer_fingerprint(tokenizer)}|{seq_len}|"
        f"{prefix}".encode()
    ).hexdigest()[:20]
    cache = cache_dir() / "text" / f"{key}.npz"
    calib = val = None
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as arrays:
                calib = torch.from_numpy(arrays["calibration"])
                val = torch.from_numpy(arrays["validation"])
        except (OSError, ValueError, KeyError):
            calib = val = None
    if calib is None or val is None:
        first, last = split_text(text)
        calib = sequences(tokenize(first, tokenizer), seq_len, prefix)
        val = sequences(tokenize(last, tokenizer), seq_len, prefix)
        if use_cache:
            import io

            buffer = io.BytesIO()
            np.savez(buffer, calibration=calib.numpy(), validation=val.numpy())
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, buffer.getvalue())
    if len(val) == 0 or len(calib) == 0:
        raise StudioError(
            f"{path.name} is too short for --seq-len {seq_len}: it gives {len(calib)} calibration "
            f"and {len(val)} validation sequences (at least one of each is needed)"
        )
    if max_sequences is not None:
        calib, val = calib[:max_sequences], val[:max_sequences]
    label = name or path.name
    return TextSplits(
        DataSet(calib, None, f"{label} (calibration, {seq_len} tokens)"),
        DataSet(val, None, f"{label} (validation, {seq_len} tokens)"),
    )


def _prefix(tokenizer: Any) -> list[int]:
    """A [CLS]-style id for encoders that expect one; nothing for causal LMs."""
    cls = getattr(tokenizer, "cls_token_id", None)
    return [int(cls)] if cls is not None else []


def is_text_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in TEXT_SUFFIXES
