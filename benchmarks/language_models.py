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

Encoder: the demo sentence encoder (BERT, 4 layers x 8 heads, MLP 1024, mean pooling,
normalised), trained by masked-language modelling on the same corpus's training split by
``packaging/train_demo_encoder.py`` (into the cache, on first use). 30 % of the head groups and
MLP neurons of every layer removed (uniform), and the same share of parameters allocated by
sensitivity; the cosine of the pooled embedding to the unpruned model's and the share of
validation windows whose nearest neighbour is unchanged, before and after distillation
(1 - cosine to the teacher). Heads and neurons are chosen on the calibration split; every
figure is measured on validation.

    python benchmarks/language_models.py [--epochs 2] [--skip-encoder] [--skip-lm]
        [--threads 1] [--encoder DIR]
"""

from __future__ import annotations

import argparse
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
from studio.core.models import hf_arch  # noqa: E402
from studio.core.models.evaluate import evaluate  # noqa: E402
from studio.core.models.load import load_model  # noqa: E402
from studio.core.models.text import load_text_data  # noqa: E402
from studio.core.paths import DEMO_LM_DIR, cache_dir  # noqa: E402
from studio.core.plan.plan import PruningPlan  # noqa: E402
from studio.core.plan.transformer import (  # noqa: E402
    allocate_transformer,
    layer_units,
    predicted_loss_drop,
)
from studio.core.prune.engine import prune, prune_targets  # noqa: E402
from studio.core.scan.heads import scan_heads  # noqa: E402
from studio.core.train.finetune import FinetuneJob, FinetuneSettings  # noqa: E402

ENCODER_SCRIPT = Path(__file__).resolve().parents[1] / "packaging" / "train_demo_encoder.py"


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
            result = prune(model, plan, val, calibration=splits.calibration)
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
    for fraction in (0.75, 0.5) if not args.skip_latency else ():
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


def demo_encoder(folder: Path | None) -> Path:
    """The trained demo encoder: ``folder`` when given, else the studio's cache, trained there
    by ``packaging/train_demo_encoder.py`` when it is not there yet (deterministic)."""
    folder = folder or cache_dir() / "demo-encoder"
    if not (folder / "model.safetensors").is_file():
        print(f"training the demo encoder into {folder} (packaging/train_demo_encoder.py)")
        subprocess.run([sys.executable, str(ENCODER_SCRIPT), "--out", str(folder)], check=True)
    return folder


@torch.no_grad()
def embeddings(module: torch.nn.Module, data) -> torch.Tensor:
    module.eval()
    return torch.cat([module(data.x[i : i + 32]) for i in range(0, len(data), 32)])


def neighbours_kept(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The share of windows whose nearest other window (by cosine of the embeddings) is the
    same one under both models: whether the embedding still ranks texts as it did."""

    def nearest(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e.float(), dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    return float((nearest(reference) == nearest(other)).float().mean())


def encoder(args) -> dict:
    folder = demo_encoder(args.encoder)
    trained = json.loads((folder / "training.json").read_text())
    model = load_model(str(folder))
    splits = load_text_data(folder / "corpus.txt", model.tokenizer, 128, name="demo-encoder")
    val = splits.validation
    base = embeddings(model.module, val)
    hf = model.module.hf
    heads = hf.config.num_attention_heads
    print(
        f"demo encoder (BERT, {hf.config.num_hidden_layers} layers x {heads} heads, MLP "
        f"{hf.config.intermediate_size}, mean pooling; masked-token accuracy "
        f"{trained['val_masked_accuracy']:.3f}, untrained "
        f"{trained['val_masked_accuracy_untrained']:.3f}); validation {len(val)} x 128 tokens"
    )
    started = time.monotonic()
    scan = scan_heads(model, splits.calibration)
    print(f"  scan {time.monotonic() - started:.0f}s{' (cached)' if scan.cached else ''}")
    names = prune_targets(model, "structured")
    uniform = PruningPlan("structured", "activation", ratios={n: 0.3 for n in names}, cap=1.0,
                          recalibrate_bn=False)  # fmt: skip
    out: dict = {"masked_accuracy": trained["val_masked_accuracy"], "runs": []}
    results = {"uniform": prune(model, uniform, val, calibration=splits.calibration)}
    kept = results["uniform"].params_after / results["uniform"].params_before
    # sensitivity allocation removing the same share of the parameters
    plan = allocate_transformer(model, kept, "sensitivity", scan)
    results["sensitivity"] = prune(model, plan, val, calibration=splits.calibration)
    for strategy, result in results.items():
        pruned = result.model.module
        layers = hf_arch.blocks(pruned.hf)
        emb = embeddings(pruned, val)
        row = {
            "allocate": strategy,
            "params_kept": result.params_after / result.params_before,
            "heads": [pruned.hf.encoder.layer[b.index].attention.self.num_attention_heads
                      for b in layers],
            "mlp": [pruned.hf.encoder.layer[b.index].intermediate.dense.out_features
                    for b in layers],
            "cosine_before": result.quality_after.cosine,
            "neighbours_before": neighbours_kept(base, emb),
        }  # fmt: skip
        if args.epochs:
            started = time.monotonic()
            tuned = finetune(result.model, model, splits, args.epochs).model
            row["tuning_seconds"] = time.monotonic() - started
            row["cosine_after"] = evaluate(tuned.module, val, reference=model.module).cosine
            row["neighbours_after"] = neighbours_kept(base, embeddings(tuned.module, val))
        out["runs"].append(row)
        print(f"  {strategy:<11}: heads {row['heads']}, MLP {row['mlp']}; params kept "
              f"{row['params_kept']:.3f}; cosine to the unpruned embedding "
              f"{row['cosine_before']:.4f}, nearest neighbour kept {row['neighbours_before']:.3f}"
              + (f"; after distillation ({args.epochs} epochs, {row['tuning_seconds']:.0f}s) "
                 f"{row['cosine_after']:.4f}, {row['neighbours_after']:.3f}"
                 if args.epochs else ""))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="0: no fine-tuning (timing only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-latency", action="store_true", help="LM quality figures only")
    parser.add_argument(
        "--encoder",
        type=Path,
        metavar="DIR",
        help="the trained encoder folder (default: trained into the cache)",
    )
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
