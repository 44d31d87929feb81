"""The shipped demo language model (resources/demo-lm): it loads with transformers and with the
studio, has the architecture the demos rely on (grouped-query attention, 8 query and 2 key/value
heads), its corpus is the one packaging/train_demo_lm.py pins, and its weights are trained (the
studio's validation perplexity is far below a unigram model's)."""

from __future__ import annotations

import ast
import json
import math

import pytest
import torch

from studio.core.models.text import load_text_data, text_sha256
from studio.core.paths import DEMO_LM_DIR, RESOURCES

SCRIPT = RESOURCES.parent / "packaging" / "train_demo_lm.py"
EXPECTED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "corpus.txt",
    "LICENSE-corpus.txt",
    "training.json",
)


def _pinned_sha256() -> str:
    """CORPUS_SHA256 as the training script declares it (read, not run: no side effects)."""
    for node in ast.parse(SCRIPT.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CORPUS_SHA256" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{SCRIPT.name} declares no CORPUS_SHA256")


@pytest.fixture(scope="module")
def training() -> dict:
    return json.loads((DEMO_LM_DIR / "training.json").read_text(encoding="utf-8"))


def test_folder_is_complete_and_small():
    for name in EXPECTED_FILES:
        assert (DEMO_LM_DIR / name).is_file(), name
    assert not list(DEMO_LM_DIR.glob("*.bin")) and not list(DEMO_LM_DIR.glob("*.pt"))
    size = sum(p.stat().st_size for p in DEMO_LM_DIR.iterdir())
    assert size < 12 * 2**20
    assert not list(RESOURCES.glob(".demo-lm.*")), "a temporary folder of the trainer was left"


def test_corpus_is_the_pinned_one(training):
    pinned = _pinned_sha256()
    with open(DEMO_LM_DIR / "corpus.txt", encoding="utf-8", newline="") as f:
        corpus = f.read()
    assert text_sha256(corpus) == pinned == training["corpus_sha256"]
    licence = (DEMO_LM_DIR / "LICENSE-corpus.txt").read_text(encoding="utf-8")
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence and pinned in licence


def test_loads_with_transformers():
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(DEMO_LM_DIR, dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 6 and cfg.hidden_size == 256
    assert cfg.num_attention_heads == 8 and cfg.num_key_value_heads == 2
    assert cfg.hidden_size // cfg.num_attention_heads == 32 and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(DEMO_LM_DIR)
    assert len(tokenizer) == cfg.vocab_size == 2048
    assert getattr(tokenizer, "cls_token_id", None) is None  # no prefix in studio windows
    text = "def f(x):\n    return x ** 2  # squares\u2026\n\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and max(ids) < cfg.vocab_size


def test_studio_perplexity_shows_trained_weights(training):
    """The studio's own path (load_hf, load_text_data, evaluate_lm) on the first validation
    windows: far below the unigram perplexity (an untrained model is near the vocabulary size,
    2048) and near the perplexity the trainer recorded on all of them."""
    from studio.core.models.evaluate import evaluate_lm
    from studio.core.models.hf import load_hf

    loaded = load_hf(DEMO_LM_DIR)
    splits = load_text_data(
        DEMO_LM_DIR / "corpus.txt", loaded.tokenizer, 128, max_sequences=16, use_cache=False
    )
    assert len(splits.validation) == 16 and splits.validation.x.shape[1] == 128
    ppl = evaluate_lm(loaded.module, splits.validation).perplexity
    assert ppl is not None and math.isfinite(ppl)
    assert ppl < training["unigram_perplexity"] / 3
    assert 0.5 < ppl / training["val_perplexity_saved"] < 2.0
    assert abs(training["val_perplexity_saved"] / training["val_perplexity"] - 1) < 0.01
