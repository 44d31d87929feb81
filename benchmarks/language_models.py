"""Transformers, measured: the demo LM pruned by parameters (sensitivity against uniform),
recovered by distillation, and timed; a BERT-family encoder folder pruned by heads and MLP
neurons, measured as cosine to the unpruned embedding.

Demo LM (``resources/demo-lm``, a Llama-style decoder with GQA trained by
``packaging/train_demo_lm.py``), on its held-out validation text (``--data demo-lm``, 128-token
windows):

- validation perplexity of the unpruned model;
- for 25 % and 50 % of the parameters removed (``--target-params 0.75`` and ``0.5``): the plan
  allocated by measured sensitivity (the head/MLP scan on the calibration split) and the
  uniform plan, each pruned structurally (head groups and MLP neurons), perplexity before
  fine-tuning, parameters kept, and the scan's predicted loss increase;
- each sensitivity plan fine-tuned by distillation from the unpruned model (next-token loss +
  KL, ``FinetuneSettings.for_text()``, ``--epochs``), perplexity after;
- prefill (one pass over 128 tokens) and per-token decode latency (KV cache, 32 new tokens),
  torch, 1 thread, batch 1, original and pruned timed in turns; and ONNX Runtime prefill of the
  exported files.

Encoder: a sentence-transformers folder (BERT, mean pooling, normalised) built from a config
with random weights by :mod:`studio.core.models.hf_zoo` (no pretrained encoder can be
downloaded), pruned by 30 % of head groups and MLP neurons in every layer, cosine of the
pooled embedding to the unpruned model's on the demo corpus's validation split, before and
after distillation (1 - cosine).

    python benchmarks/language_models.py [--epochs 2] [--skip-encoder] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from studio.core.latency.decode import compare_lm_latency  # noqa: E402
from studio.core.models import hf_zoo  # noqa: E402
from studio.core.models.evaluate import evaluate  # noqa: E402
from studio.core.models.load import load_model  # noqa: E402
from studio.core.models.text import load_text_data  # noqa: E402
from studio.core.paths import DEMO_LM_DIR  # noqa: E402
from studio.core.plan.plan import PruningPlan  # noqa: E402
from studio.core.plan.transformer import (  # noqa: E402
    allocate_transformer,
    layer_units,
    predicted_loss_drop,
)
from studio.core.prune.engine import prune, prune_targets  # noqa: E402
from studio.core.scan.heads import scan_heads  # noqa: E402
from studio.core.train.finetune import FinetuneJob, FinetuneSettings  # noqa: E402


def cpu() -> str:
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "?"
    name = next(
        (ln.split(":", 1)[1].strip() for ln in flags.splitlines() if "Model name" in ln), "?"
    )
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {isa}"


def finetune(student, teacher, splits, epochs: int):
    settings = FinetuneSettings.for_text(epochs=epochs)
    job = FinetuneJob(student, splits.calibration, splits.validation, settings, teacher)
    for _ in job.run():
        pass
    assert job.result is not None
    return job.result


def lm(args) -> dict:
    model = load_model("demo-lm")
    splits = load_text_data(DEMO_LM_DIR / "corpus.txt", model.tokenizer, 128, name="demo-lm")
    val = splits.validation
    total = sum(p.numel() for p in model.module.parameters())
    print(f"demo LM: {total:,} parameters; validation {len(val)} x 128 tokens; "
          f"calibration {len(splits.calibration)}")  # fmt: skip
    base = evaluate(model.module, val)
    print(f"  unpruned: perplexity {base.perplexity:.3f}")
    started = time.monotonic()
    scan = scan_heads(model, splits.calibration)
    print(f"  scan: {len(scan.layers)} layers x {max(scan.groups)} head groups, "
          f"{len(scan.mlp_ratios)} MLP ratios, {time.monotonic() - started:.1f}s"
          f"{' (cached)' if scan.cached else ''}")  # fmt: skip
    units = layer_units(model)
    out = {"params": total, "perplexity": base.perplexity, "runs": []}
    pruned_models = {}
    for fraction in (0.75, 0.5):
        for strategy in ("sensitivity", "uniform"):
            plan = allocate_transformer(model, fraction, strategy, scan)
            result = prune(model, plan, val)
            q = result.quality_after
            row = {
                "target": fraction,
                "allocate": strategy,
                "params_kept": result.params_after / result.params_before,
                "perplexity": q.perplexity,
                "agreement": q.agreement,
                "predicted_loss_increase": predicted_loss_drop(scan, units, dict(plan.ratios)),
                "ratios": dict(plan.ratios),
            }
            out["runs"].append(row)
            pruned_models[(fraction, strategy)] = result.model
            print(f"  {1 - fraction:.0%} removed, {strategy:<11}: params kept "
                  f"{row['params_kept']:.3f}, perplexity {q.perplexity:.3f} (predicted loss +"
                  f"{row['predicted_loss_increase']:.3f})")  # fmt: skip
    for fraction in (0.75, 0.5):
        student = pruned_models[(fraction, "sensitivity")]
        if args.epochs == 0:  # timing only: the structure is what fine-tuning keeps
            pruned_models[(fraction, "tuned")] = student
            continue
        started = time.monotonic()
        tuned = finetune(student, model, splits, args.epochs)
        row = next(
            r for r in out["runs"] if r["target"] == fraction and r["allocate"] == "sensitivity"
        )
        row["tuned_perplexity"] = tuned.perplexity_after
        row["tuning_seconds"] = time.monotonic() - started
        pruned_models[(fraction, "tuned")] = tuned.model
        print(f"  {1 - fraction:.0%} removed, distilled {args.epochs} epoch(s): perplexity "
              f"{tuned.perplexity_before:.3f} -> {tuned.perplexity_after:.3f} "
              f"({row['tuning_seconds']:.0f}s)")  # fmt: skip
    for fraction in (0.75, 0.5):
        after = pruned_models[(fraction, "tuned")]
        cmp = compare_lm_latency(model.module, after.module, prompt_len=128, new_tokens=32,
                                 threads=args.threads)  # fmt: skip
        row = next(
            r for r in out["runs"] if r["target"] == fraction and r["allocate"] == "sensitivity"
        )
        row["latency"] = {
            "prefill_ms": [cmp.before.prefill_ms, cmp.after.prefill_ms],
            "decode_ms": [cmp.before.decode_ms, cmp.after.decode_ms],
            "prefill_speedup": cmp.prefill_speedup,
            "decode_speedup": cmp.decode_speedup,
        }
        print(f"  {1 - fraction:.0%} removed, torch {args.threads} thread: prefill "
              f"{cmp.before.prefill_ms:.2f} -> {cmp.after.prefill_ms:.2f} ms "
              f"({cmp.prefill_speedup:.2f}x), decode {cmp.before.decode_ms:.3f} -> "
              f"{cmp.after.decode_ms:.3f} ms/token ({cmp.decode_speedup:.2f}x)")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            from studio.core.export.hf_onnx import export_text_onnx

            a = export_text_onnx(
                model.module, Path(tmp) / "a.onnx", model.example_input(), "causal-lm"
            )
            b = export_text_onnx(
                after.module, Path(tmp) / "b.onnx", after.example_input(), "causal-lm"
            )
            ort_cmp = compare_lm_latency(
                model.module, after.module, prompt_len=128, new_tokens=1, threads=args.threads,
                backend="onnxruntime", before_onnx=a, after_onnx=b,
            )  # fmt: skip
            ra, rb = ort_cmp.before, ort_cmp.after
            row["latency"]["ort_prefill_ms"] = [ra.prefill_ms, rb.prefill_ms]
            speedup = ra.prefill_ms / rb.prefill_ms
            print(f"  {1 - fraction:.0%} removed, ONNX Runtime {args.threads} thread: prefill "
                  f"{ra.prefill_ms:.2f} -> {rb.prefill_ms:.2f} ms ({speedup:.2f}x)")  # fmt: skip
    return out


def encoder(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_zoo.write_folder("sentence-bert", Path(tmp) / "st", layers=4)
        model = load_model(str(folder))
        splits = load_text_data(DEMO_LM_DIR / "corpus.txt", model.tokenizer, 128, name="demo-lm")
        names = prune_targets(model, "structured")
        plan = PruningPlan("structured", "activation", ratios={n: 0.3 for n in names}, cap=1.0,
                           recalibrate_bn=False)  # fmt: skip
        result = prune(model, plan, splits.validation)
        before = result.quality_after.cosine
        reference = copy.deepcopy(model)
        tuned = finetune(result.model, reference, splits, args.epochs)
        after = evaluate(tuned.model.module, splits.validation, reference=model.module).cosine
        hf = result.module.hf
        heads = [layer.attention.self.query.out_features // 16 for layer in hf.encoder.layer]
        inter = [layer.intermediate.dense.out_features for layer in hf.encoder.layer]
        print(f"encoder (sentence-transformers BERT, random weights, 4 layers x 4 heads, "
              f"MLP 256): kept heads {heads}, MLP {inter}; params "
              f"{result.params_after / result.params_before:.3f}; cosine to the unpruned "
              f"embedding {before:.4f} before, {after:.4f} after distillation")  # fmt: skip
        return {"heads": heads, "mlp": inter, "cosine_before": before, "cosine_after": after,
                "params_kept": result.params_after / result.params_before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="0: no fine-tuning (timing only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {cpu()}; torch {torch.__version__}")
    figures = {"cpu": cpu()}
    if not args.skip_lm:
        figures["lm"] = lm(args)
    if not args.skip_encoder:
        figures["encoder"] = encoder(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
