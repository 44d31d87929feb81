"""Train a small BERT-style sentence encoder on the demo LM's corpus (pydoc topics, PSF License).

The figures for pruning an encoder need a trained one, and none can be downloaded here. This
script trains one the way BERT was trained, by masked-language modelling (15 % of the tokens
chosen; of those 80 % replaced by [MASK], 10 % by a random token, 10 % kept), on the first 90 %
of the corpus (the studio's own split, :func:`studio.core.models.text.split_text`), with a
byte-level BPE tokenizer trained on that split alone. Its windows are the studio's: [CLS] and
127 tokens.

It writes a sentence-transformers folder: the BERT encoder (config.json + model.safetensors,
bfloat16 weights; the MLM head is not kept), the tokenizer, ``1_Pooling`` (mean of the token
states), ``2_Normalize`` and ``modules.json``, so the studio loads it as an encoder whose output is
the pooled, normalised embedding; plus corpus.txt, its licence and training.json with the
figures (masked-token accuracy on the validation split, before and after training). The folder
is written beside ``--out`` and moved into place only when complete and verified. Deterministic
for a given seed, step count and thread count.

    python packaging/train_demo_encoder.py --out DIR [--steps N]

The benchmark ``benchmarks/language_models.py`` trains it into the studio's cache when it is not
there yet; it is not shipped in ``resources/`` (the figures need it, the demos do not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_demo_lm.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_demo_lm import (  # noqa: E402
    CORPUS_SHA256,
    SEED,
    SEQ_LEN,
    CorpusError,
    check_tokenizer,
    load_corpus,
    loss_digest,
    lr_at,
    seed_all,
    staged_folder,
    train_tokenizer,
    write_corpus,
)

from studio.core.models.text import sequences, split_text, tokenize  # noqa: E402
from studio.core.paths import DEMO_LM_DIR  # noqa: E402

SPECIAL = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
ARCHITECTURE = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    intermediate_size=1024,
    max_position_embeddings=512,
)
EVAL_MASK_RATE = 0.15  # validation is always measured as BERT's: 15 % of the tokens chosen


def build_model(tokenizer, dropout: float = 0.1) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **ARCHITECTURE,
    )
    return BertForMaskedLM(config)


def mask_tokens(
    x: torch.Tensor, tokenizer, gen: torch.Generator, rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of the windows ``x``: (inputs, labels), labels -100 where not chosen.
    ``rate`` of the tokens are chosen; the [CLS] in column 0 never is."""
    chosen = torch.rand(x.shape, generator=gen) < rate
    chosen[:, 0] = False
    labels = torch.where(chosen, x, torch.full_like(x, -100))
    roll = torch.rand(x.shape, generator=gen)
    inputs = x.clone()
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    first = len(SPECIAL)  # ordinary tokens come after the special ones
    random_ids = torch.randint(first, len(tokenizer), x.shape, generator=gen)
    inputs[swap] = random_ids[swap]
    return inputs, labels


def mlm_loss(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


@torch.no_grad()
def masked_accuracy(model: torch.nn.Module, windows: torch.Tensor, tokenizer, seed: int) -> tuple:
    """(accuracy, loss) on the chosen tokens of ``windows``, corrupted with a fixed seed so that
    every checkpoint is measured on the same masks."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    right, total, loss_sum = 0, 0, 0.0
    for start in range(0, len(windows), 32):
        inputs, labels = mask_tokens(windows[start : start + 32], tokenizer, gen, EVAL_MASK_RATE)
        logits = model(input_ids=inputs).logits.float()
        chosen = labels != -100
        right += int((logits.argmax(-1)[chosen] == labels[chosen]).sum())
        total += int(chosen.sum())
        loss_sum += float(F.cross_entropy(logits[chosen], labels[chosen], reduction="sum"))
    return right / total, loss_sum / total


def train(model, train_ids, val, tokenizer, args) -> tuple[list[float], list[tuple]]:
    """AdamW on random windows ([CLS] + 127 tokens) of the training stream, drawn and masked
    with a seeded generator; returns every step's loss and the validation accuracy at
    checkpoints."""
    gen = torch.Generator().manual_seed(args.seed)
    stream = torch.from_numpy(train_ids)
    body = SEQ_LEN - 1
    offsets = torch.arange(body)
    cls = torch.full((args.batch_size, 1), tokenizer.cls_token_id, dtype=torch.int64)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    losses: list[float] = []
    curve: list[tuple[int, float, float]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        model.train()
        starts = torch.randint(0, len(stream) - body + 1, (args.batch_size, 1), generator=gen)
        x = torch.cat([cls, stream[starts + offsets]], dim=1)
        inputs, labels = mask_tokens(x, tokenizer, gen, args.mask_rate)
        loss = mlm_loss(model, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            acc, val_loss = masked_accuracy(model, val, tokenizer, args.seed)
            curve.append((done, acc, val_loss))
            recent = losses[-args.eval_every :]
            print(
                f"step {done:5d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"val masked accuracy {acc:.3f} (loss {val_loss:.3f})  "
                f"({time.perf_counter() - start:.0f} s, "
                f"{time.process_time() - cpu_start:.0f} s CPU)",
                flush=True,
            )
    return losses, curve


def write_folder(out: Path, model, tokenizer, corpus: str, info: dict, val: torch.Tensor) -> dict:
    """The sentence-transformers folder, staged beside ``out`` and checked before the swap: the
    tokenizer loads back with the trained ids, and the bfloat16 encoder loaded as float32 gives
    the trained model's token states (the MLM head on top gives about the same accuracy)."""
    from transformers import AutoTokenizer, BertModel

    with staged_folder(out) as tmp:
        # BertModel as sentence-transformers folders hold it: with its pooler (seeded; the mean
        # pooling does not use it), so that AutoModel finds every weight it builds
        torch.manual_seed(info["seed"])
        encoder = BertModel(model.config, add_pooling_layer=True)
        missing, unexpected = encoder.load_state_dict(model.bert.state_dict(), strict=False)
        if unexpected or any(not k.startswith("pooler.") for k in missing):
            raise RuntimeError(f"weights that do not fit BertModel: {missing + unexpected}")
        encoder.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_corpus(tmp, corpus, "The demo sentence encoder", "train_demo_encoder.py")
        (tmp / "1_Pooling").mkdir()
        pooling = {
            "word_embedding_dimension": model.config.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
        }
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
        st = "sentence_transformers.models."
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"},
        ]
        (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (tmp / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": SEQ_LEN, "do_lower_case": False}, indent=2) + "\n"
        )

        check_tokenizer(AutoTokenizer.from_pretrained(tmp), tokenizer, corpus)
        loaded = BertModel.from_pretrained(tmp, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            states = loaded(input_ids=val[:8]).last_hidden_state
            drift = float((states - model.bert(input_ids=val[:8]).last_hidden_state).abs().max())
        model.bert = loaded
        info["val_masked_accuracy_saved"] = round(
            masked_accuracy(model, val, tokenizer, info["seed"])[0], 4
        )
        info["saved_state_max_difference"] = round(drift, 4)
        info["files_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument(
        "--mask-rate", type=float, default=0.15, help="share of tokens chosen in training"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=80)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-save", action="store_true", help="train and report, write nothing (for trials)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    started = time.perf_counter()
    seed_all(args.seed, threads=args.threads)
    try:
        corpus, source = load_corpus([DEMO_LM_DIR])
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_text, val_text = split_text(corpus)
    tokenizer = train_tokenizer(train_text, **SPECIAL)
    train_ids = tokenize(train_text, tokenizer)
    val = sequences(tokenize(val_text, tokenizer), SEQ_LEN, prefix=[tokenizer.cls_token_id])
    print(
        f"corpus {len(corpus):,} characters from {source}; vocabulary {len(tokenizer)}; "
        f"{len(train_ids):,} training tokens, {len(val)} validation windows of {SEQ_LEN}",
        flush=True,
    )
    torch.manual_seed(args.seed)
    model = build_model(tokenizer, args.dropout)
    params = sum(p.numel() for p in model.bert.parameters())
    untrained = masked_accuracy(model, val, tokenizer, args.seed)[0]
    print(
        f"BERT encoder, {params:,} parameters; {args.steps} steps of {args.batch_size} windows; "
        f"masked accuracy untrained {untrained:.3f}",
        flush=True,
    )
    train_start, cpu_start = time.perf_counter(), time.process_time()
    losses, curve = train(model, train_ids, val, tokenizer, args)
    tail = losses[-min(100, len(losses)) :]
    info = {
        "model": "BertModel (sentence-transformers: mean pooling, normalised)",
        "objective": f"masked-language modelling, {args.mask_rate:.0%} of tokens (80/10/10)",
        "validation": f"masked-token accuracy, {EVAL_MASK_RATE:.0%} of tokens, fixed masks",
        "parameters": params,
        "architecture": {"vocab_size": len(tokenizer), **ARCHITECTURE},
        "weights_dtype": "bfloat16",
        "seq_len": SEQ_LEN,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "dropout": args.dropout,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "train_seconds": round(time.perf_counter() - train_start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "train_loss_last_100": round(sum(tail) / len(tail), 4),
        "loss_digest": loss_digest(losses),
        "training_tokens": int(len(train_ids)),
        "validation_windows": len(val),
        "val_masked_accuracy_untrained": round(untrained, 4),
        "val_masked_accuracy": round(curve[-1][1], 4),
        "val_curve": [[s, round(a, 4), round(v, 4)] for s, a, v in curve],
        "corpus_sha256": CORPUS_SHA256,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    if not args.no_save:
        write_folder(args.out, model, tokenizer, corpus, info, val)
    elapsed = time.perf_counter() - started
    print(
        f"val masked accuracy {info['val_masked_accuracy']:.3f} (untrained {untrained:.3f}); "
        f"loss digest {info['loss_digest']}; training {info['train_seconds'] / 60:.1f} min, "
        f"all {elapsed / 60:.1f} min" + ("" if args.no_save else f"; saved {args.out}"),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
