"""Train the bundled demo language model: a small Llama-architecture decoder on pydoc topics.

The corpus is the text of CPython's ``Lib/pydoc_data/topics.py`` (PSF License), the topics joined
by blank lines in sorted order; it is shipped as ``resources/demo-lm/corpus.txt`` so that the data
is the same on every Python, and pinned here by its sha256. The split is the studio's own
(:func:`studio.core.models.text.split_text`): a byte-level BPE tokenizer and the model are trained
on the first 90% only, and the validation perplexity is measured on the last 10% exactly as the
studio measures it (the stream tokenized without special tokens, non-overlapping 128-token
windows, the mean next-token cross entropy over all positions, exp of the mean).

The folder written holds config.json + model.safetensors (bfloat16 weights), the tokenizer
(loadable with ``transformers.AutoTokenizer``), corpus.txt, LICENSE-corpus.txt and
training.json with the figures. It is written to a temporary folder beside ``--out`` and moved
into place only when complete and verified. Deterministic for a given seed, step count and
thread count (the step count is fixed, not time-based): a second run wrote the same bytes.
On 2 idle cores of an AMD EPYC (AVX2) the whole script took 5.6 minutes (5.5 of them training,
535 CPU seconds). 500 steps, not more: with 1000 (a cosine schedule over 1000) the validation
perplexity was 82.2 at step 500 and 94.4 at the end, the model learning its training text by
heart; with 500 it ends at 77.5.

    python packaging/train_demo_lm.py [--out resources/demo-lm] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

# Threads that wait for work sleep instead of spinning: on a shared machine a spinning OpenMP
# barrier whose partner thread is descheduled makes every small op many times slower. It has to
# be set before torch loads OpenMP; it does not change any result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from studio.core.models.text import sequences, split_text, text_sha256, tokenize  # noqa: E402
from studio.core.paths import DEMO_LM_DIR  # noqa: E402

#: sha256 of corpus.txt (UTF-8): the pydoc topics of Python 3.11.7, 465,126 characters.
CORPUS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"
SEED = 0
SEQ_LEN = 128
VOCAB_SIZE = 2048
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
ARCHITECTURE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

LICENSE_CORPUS = """\
corpus.txt in this folder is the text of the pydoc topics of CPython 3.11.7
(Lib/pydoc_data/topics.py, the dictionary `topics`), joined by blank lines in sorted key order:

    "\\n\\n".join(topics[k] for k in sorted(topics))

sha256 {sha}

{model} in this folder (model.safetensors) and its tokenizer were trained on
the first 90% of that text by packaging/{script}. Changes made: the topics were
concatenated as above; the text itself is unchanged.

Source: https://github.com/python/cpython/blob/v3.11.7/Lib/pydoc_data/topics.py
Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.
Distributed under the Python Software Foundation License Version 2, reproduced below.


PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2
---------------------------------------------

1. This LICENSE AGREEMENT is between the Python Software Foundation
("PSF"), and the Individual or Organization ("Licensee") accessing and
otherwise using this software ("Python") in source or binary form and
its associated documentation.

2. Subject to the terms and conditions of this License Agreement, PSF hereby
grants Licensee a nonexclusive, royalty-free, world-wide license to reproduce,
analyze, test, perform and/or display publicly, prepare derivative works,
distribute, and otherwise use Python alone or in any derivative version,
provided, however, that PSF's License Agreement and PSF's notice of copyright,
i.e., "Copyright (c) 2001, 2002, 2003, 2004, 2005, 2006, 2007, 2008, 2009, 2010,
2011, 2012, 2013, 2014, 2015, 2016, 2017, 2018, 2019, 2020, 2021, 2022, 2023 \
Python Software Foundation;
All Rights Reserved" are retained in Python alone or in any derivative version
prepared by Licensee.

3. In the event Licensee prepares a derivative work that is based on
or incorporates Python or any part thereof, and wants to make
the derivative work available to others as provided herein, then
Licensee hereby agrees to include in any such work a brief summary of
the changes made to Python.

4. PSF is making Python available to Licensee on an "AS IS"
basis.  PSF MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PSF MAKES NO AND
DISCLAIMS ANY REPRESENTATION OR WARRANTY OF MERCHANTABILITY OR FITNESS
FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF PYTHON WILL NOT
INFRINGE ANY THIRD PARTY RIGHTS.

5. PSF SHALL NOT BE LIABLE TO LICENSEE OR ANY OTHER USERS OF PYTHON
FOR ANY INCIDENTAL, SPECIAL, OR CONSEQUENTIAL DAMAGES OR LOSS AS
A RESULT OF MODIFYING, DISTRIBUTING, OR OTHERWISE USING PYTHON,
OR ANY DERIVATIVE THEREOF, EVEN IF ADVISED OF THE POSSIBILITY THEREOF.

6. This License Agreement will automatically terminate upon a material
breach of its terms and conditions.

7. Nothing in this License Agreement shall be deemed to create any
relationship of agency, partnership, or joint venture between PSF and
Licensee.  This License Agreement does not grant permission to use PSF
trademarks or trade name in a trademark sense to endorse or promote
products or services of Licensee, or any third party.

8. By copying, installing or otherwise using Python, Licensee
agrees to be bound by the terms and conditions of this License
Agreement.
"""


class CorpusError(Exception):
    """The corpus text is not the pinned one."""


def pydoc_corpus() -> str:
    """The corpus built from this Python's ``pydoc_data`` (identical on 3.11.7 only)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_corpus(folders: list[Path]) -> tuple[str, str]:
    """(text, where it came from): the first ``corpus.txt`` found in ``folders``, else the
    corpus rebuilt from ``pydoc_data``; either way its sha256 must be :data:`CORPUS_SHA256`."""
    for folder in folders:
        path = folder / "corpus.txt"
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
            digest = text_sha256(text)
            if digest != CORPUS_SHA256:
                raise CorpusError(
                    f"{path} has sha256 {digest[:16]}..., expected {CORPUS_SHA256[:16]}... "
                    "(restore it from the repository, or delete it to rebuild it from pydoc_data)"
                )
            return text, str(path)
    text = pydoc_corpus()
    digest = text_sha256(text)
    if digest != CORPUS_SHA256:
        raise CorpusError(
            f"the pydoc topics of Python {platform.python_version()} have sha256 "
            f"{digest[:16]}..., expected {CORPUS_SHA256[:16]}... (those of 3.11.7); "
            "use the repository's resources/demo-lm/corpus.txt"
        )
    return text, f"pydoc_data (Python {platform.python_version()})"


def train_tokenizer(text: str, **special: str):
    """A byte-level BPE tokenizer of :data:`VOCAB_SIZE` tokens trained on ``text``, wrapped for
    ``transformers`` (no special tokens are added when encoding; decoding is lossless).
    ``special`` names the special tokens (``unk_token=...``, ``bos_token=...``), in the order of
    their ids; by default the decoder's <unk>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = special or {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS}
    backend = Tokenizer(models.BPE(unk_token=special["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(special.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **special
    )


def build_model(tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **ARCHITECTURE,
    )
    return LlamaForCausalLM(config)


def add_residual_dropout(model: torch.nn.Module, p: float) -> list:
    """Dropout on what each attention and MLP block adds to the residual stream, in training
    mode only (Llama itself has none; these hooks are removed before saving). Returns the hook
    handles."""
    handles = []
    for layer in model.model.layers:
        handles.append(
            layer.self_attn.register_forward_hook(
                lambda mod, _, out: (F.dropout(out[0], p, mod.training), *out[1:])
            )
        )
        handles.append(
            layer.mlp.register_forward_hook(lambda mod, _, out: F.dropout(out, p, mod.training))
        )
    return handles


def window_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all positions of the windows ``x`` (B, T)."""
    logits = model(input_ids=x).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """exp of the mean next-token cross entropy over every position of every window."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size]
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(window_loss(model, x)) * n
        count += n
    return math.exp(total / count)


def unigram_perplexity(train_ids: np.ndarray, windows: torch.Tensor, vocab: int) -> float:
    """Perplexity of the add-one-smoothed token frequencies of the training stream on the same
    predicted positions as :func:`perplexity` (every position after the first)."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1).numpy()
    return math.exp(-float(logp[targets].mean()))


def seed_all(seed: int, threads: int) -> None:
    """Every generator seeded, deterministic kernels, a fixed number of threads."""
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr / 10`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module,
    train_ids: np.ndarray,
    val: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    eval_every: int,
    dropout: float,
) -> tuple[list[float], list[tuple[int, float]]]:
    """AdamW on random ``SEQ_LEN``-token windows of the training stream, drawn with a seeded
    generator; returns the loss of every step and the validation perplexity at checkpoints."""
    gen = torch.Generator().manual_seed(seed)
    stream = torch.from_numpy(train_ids)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    handles = add_residual_dropout(model, dropout) if dropout > 0 else []
    offsets = torch.arange(SEQ_LEN)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        model.train()
        starts = torch.randint(0, len(stream) - SEQ_LEN + 1, (batch_size, 1), generator=gen)
        x = stream[starts + offsets]
        loss = window_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done % eval_every == 0 or done == steps:
            ppl = perplexity(model, val)
            curve.append((done, ppl))
            recent = losses[-eval_every:]
            print(
                f"step {done:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"val ppl {ppl:.2f}  ({time.perf_counter() - start:.0f} s, "
                f"{time.process_time() - cpu_start:.0f} s CPU)",
                flush=True,
            )
    for handle in handles:
        handle.remove()
    return losses, curve


def loss_digest(losses: list[float]) -> str:
    """A hash of the exact per-step losses, to compare two runs bit for bit."""
    return hashlib.sha256(b"".join(struct.pack("<d", v) for v in losses)).hexdigest()[:16]


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield a new temporary folder beside ``out`` to write into; when the block ends without an
    error, the folder (with the usual file modes) replaces ``out``. Nothing is left behind on
    failure, and a failed swap puts the old ``out`` back."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the usual folder mode
        yield tmp
        for path in tmp.rglob("*"):  # safetensors writes 0600; give the usual modes
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(
    out: Path, model: torch.nn.Module, tokenizer, corpus: str, info: dict, val: torch.Tensor
) -> dict:
    """Write the whole folder into a temporary folder beside ``out``, check that it loads back
    (AutoTokenizer gives the same ids, the bfloat16 weights loaded as float32 give about the same
    perplexity), then swap it into place. Nothing is left behind on failure."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    with staged_folder(out) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        model.to(torch.float32)
        tokenizer.save_pretrained(tmp)
        write_corpus(tmp, corpus)
        loaded_tok = AutoTokenizer.from_pretrained(tmp)
        check_tokenizer(loaded_tok, tokenizer, corpus)
        loaded = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        info["val_perplexity_saved"] = round(perplexity(loaded, val), 4)
        info["files_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def write_corpus(
    folder: Path,
    corpus: str,
    model: str = "The demo language model",
    script: str = "train_demo_lm.py",
) -> None:
    """corpus.txt and its licence, as shipped beside a model trained on it."""
    with open(folder / "corpus.txt", "w", encoding="utf-8", newline="") as f:
        f.write(corpus)
    licence = LICENSE_CORPUS.format(sha=CORPUS_SHA256, model=model, script=script)
    (folder / "LICENSE-corpus.txt").write_text(licence, encoding="utf-8")


def check_tokenizer(loaded, trained, corpus: str) -> None:
    """The saved tokenizer, loaded back, gives the trained ids and decodes losslessly."""
    _, val_text = split_text(corpus)
    for label, text in (("validation", val_text), ("corpus", corpus)):
        if not np.array_equal(tokenize(text, loaded), tokenize(text, trained)):
            raise RuntimeError(f"AutoTokenizer does not give the trained ids on the {label}")
    if loaded.decode(tokenize(val_text, loaded).tolist()) != val_text:
        raise RuntimeError("the saved tokenizer does not decode the validation text back")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_LM_DIR)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--no-save", action="store_true", help="train and report, write nothing (for trials)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    started = time.perf_counter()
    seed_all(args.seed, threads=2)
    try:
        corpus, source = load_corpus(list(dict.fromkeys([args.out, DEMO_LM_DIR])))
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_text, val_text = split_text(corpus)
    tokenizer = train_tokenizer(train_text)
    train_ids = tokenize(train_text, tokenizer)
    val = sequences(tokenize(val_text, tokenizer), SEQ_LEN)
    unigram = unigram_perplexity(train_ids, val, len(tokenizer))
    print(
        f"corpus {len(corpus):,} characters from {source}; vocabulary {len(tokenizer)}; "
        f"{len(train_ids):,} training tokens, {len(val)} validation windows of {SEQ_LEN}; "
        f"unigram perplexity {unigram:.2f}",
        flush=True,
    )

    torch.manual_seed(args.seed)
    model = build_model(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Llama decoder, {params:,} parameters; {args.steps} steps of {args.batch_size} windows",
        flush=True,
    )
    train_start, cpu_start = time.perf_counter(), time.process_time()
    losses, curve = train(
        model,
        train_ids,
        val,
        args.steps,
        args.batch_size,
        args.lr,
        args.warmup,
        args.seed,
        args.eval_every,
        args.dropout,
    )
    train_seconds = time.perf_counter() - train_start
    train_cpu_seconds = time.process_time() - cpu_start
    tail = losses[-min(100, len(losses)) :]
    val_ppl = curve[-1][1]
    info = {
        "model": "LlamaForCausalLM",
        "parameters": params,
        "architecture": {"vocab_size": len(tokenizer), **ARCHITECTURE},
        "weights_dtype": "bfloat16",
        "seq_len": SEQ_LEN,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "residual_dropout": args.dropout,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "train_loss_last_100": round(sum(tail) / len(tail), 4),
        "loss_digest": loss_digest(losses),
        "training_tokens": int(len(train_ids)),
        "validation_windows": len(val),
        "val_perplexity": round(val_ppl, 4),
        "val_curve": [[s, round(p, 3)] for s, p in curve],
        "unigram_perplexity": round(unigram, 4),
        "corpus_sha256": CORPUS_SHA256,
        "corpus_characters": len(corpus),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__,
    }
    print(f"loss digest {info['loss_digest']}", flush=True)
    if not args.no_save:
        write_folder(args.out, model, tokenizer, corpus, info, val)
    elapsed = time.perf_counter() - started
    saved = info.get("val_perplexity_saved")
    print(
        f"final train loss {info['train_loss_last_100']:.4f} (last 100 steps); val perplexity "
        f"{val_ppl:.2f} (float32)"
        + (f", {saved:.2f} (saved bfloat16 loaded as float32)" if saved is not None else "")
        + f"; unigram {unigram:.2f}; training {train_seconds / 60:.1f} min, "
        f"all {elapsed / 60:.1f} min" + ("" if args.no_save else f"; saved {args.out}"),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
