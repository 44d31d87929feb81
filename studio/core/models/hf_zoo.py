"""Small Hugging Face model folders built from configs with random weights, by the project's
own code (nothing is downloaded): a BERT encoder, a sentence-transformers folder around it, GPT-2,
a Llama-style decoder with grouped-query attention, Qwen2 (biases on q/k/v) and ViT.

The tests and benchmarks use them as stand-ins for folders users bring; each has a byte-level
BPE tokenizer trained on Python's pydoc topics (PSF licence, on every Python), so text data
works with them as with real models.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from studio.core.errors import StudioError

FAMILIES = ("bert", "sentence-bert", "gpt2", "llama", "qwen2", "vit")
VOCAB = 384


def corpus_text() -> str:
    """Python's pydoc topics, joined in sorted order (the demo LM's corpus)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=2)
def _tokenizer_json(vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "[CLS]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus_text()[:150_000]], trainer)
    return tok.to_str()


def tokenizer(vocab: int = VOCAB, cls: bool = False):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    extra = {"cls_token": "[CLS]"} if cls else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        **extra,
    )


def build(family: str, seed: int = 0, layers: int = 4, hidden: int = 64):  # -> PreTrainedModel
    """A random-weight transformers model of ``family`` (eager attention, float32)."""
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    common = {"attn_implementation": "eager"}
    if family in ("bert", "sentence-bert"):
        config = tf.BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=256,
        )  # fmt: skip
        return tf.BertModel(config).eval()
    if family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
        return tf.GPT2LMHeadModel(config).eval()
    if family == "llama":
        config = tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=2, intermediate_size=3 * hidden,
            max_position_embeddings=256, tie_word_embeddings=True, **common,
        )  # fmt: skip
        return tf.LlamaForCausalLM(config).eval()
    if family == "qwen2":
        config = tf.Qwen2Config(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * hidden,
            max_position_embeddings=256, **common,
        )  # fmt: skip
        return tf.Qwen2ForCausalLM(config).eval()
    if family == "vit":
        config = tf.ViTConfig(
            image_size=32, patch_size=8, num_channels=3, hidden_size=hidden,
            num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden,
            num_labels=10,
        )  # fmt: skip
        return tf.ViTForImageClassification(config).eval()
    raise StudioError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")


def write_folder(family: str, path: str | Path, seed: int = 0, layers: int = 4) -> Path:
    """Save a random-weight model of ``family`` (and its tokenizer) as a model folder."""
    path = Path(path)
    model = build(family, seed, layers)
    if family == "sentence-bert":  # the transformer in the folder itself, then pooling
        model.save_pretrained(path, safe_serialization=True)
        tokenizer(cls=True).save_pretrained(path)
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": model.config.hidden_size,
                    "pooling_mode_mean_tokens": True,
                }
            )  # fmt: skip
        )
        st = "sentence_transformers.models."
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"},
        ]
        (path / "modules.json").write_text(json.dumps(modules))
        return path
    model.save_pretrained(path, safe_serialization=True)
    if family != "vit":
        tokenizer(cls=family == "bert").save_pretrained(path)
    return path
