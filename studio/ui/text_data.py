"""Which data goes with which model, and text data tokenized for a language model.

Text data (``demo-lm``, a .txt/.jsonl/.md file) is tokenized with the model's own tokenizer
into sequences of the model's input length, split into calibration and validation as the CLI
does (studio.core.models.text). Image and array data go with every other model. The checks
here give the one-line messages the window shows when the two do not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.models.loaded import LoadedModel
from studio.core.models.text import TextSplits, is_text_file, load_text_data
from studio.core.paths import DEMO_LM_DIR

DEMO_LM = "demo-lm"
DEMO_LM_NAME = "demo-lm corpus"


def is_text_spec(spec: str) -> bool:
    """``demo-lm`` or a text file: data that has to be tokenized by a language model."""
    return spec == DEMO_LM or is_text_file(spec)


def text_path(spec: str) -> Path:
    return DEMO_LM_DIR / "corpus.txt" if spec == DEMO_LM else Path(spec)


def display_name(spec: str) -> str:
    return DEMO_LM_NAME if spec == DEMO_LM else Path(spec).name


def pairing_problem(model: LoadedModel, spec: str, is_text: bool) -> str | None:
    """The one-line reason data opened from ``spec`` (text or not) cannot go with ``model``,
    or None when it can."""
    name = display_name(spec)
    if is_text and not model.is_text:
        return (
            f"{name} is text: it goes with a language model from a Hugging Face folder "
            f"(File ▸ Open model folder…), not with {model.name}"
        )
    if not is_text and model.is_text:
        return (
            f"{model.name} is a language model: open text data (demo-lm corpus, a .txt or "
            f".jsonl file), not {name}"
        )
    return None


def tokenize_job(model: LoadedModel, spec: str) -> Callable[[ProgressFn, CancelToken], TextSplits]:
    """A job that reads and tokenizes ``spec`` with ``model``'s tokenizer at its input length
    (cached by the core: opening the same text again is quick)."""
    tokenizer, seq_len = model.tokenizer, int(model.input_shape[-1])
    path = text_path(spec)
    name = DEMO_LM_NAME if spec == DEMO_LM else None

    def tokenize(progress: ProgressFn, cancel: CancelToken) -> TextSplits:
        progress(0.0, f"tokenizing {path.name} into {seq_len}-token sequences")
        splits = load_text_data(path, tokenizer, seq_len, name=name)
        cancel.check()
        progress(1.0, "")
        return splits

    return tokenize
