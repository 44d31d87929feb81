"""The command line on Hugging Face folders: scan, prune to a folder and to ONNX, reload,
evaluate, distil; the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from studio.cli import main
from studio.core.models import hf_zoo
from studio.core.models.load import load_model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_hf")
    text = root / "corpus.txt"
    text.write_text(hf_zoo.corpus_text()[:40_000])
    return hf_zoo.write_folder("llama", root / "llama"), text


def test_scan_prune_reload_and_distil(capsys, llama, tmp_path):
    folder, text = llama
    common = ["--data", str(text), "--seq-len", "32"]
    code, out, _ = run(
        capsys, "scan", "--model", str(folder), *common, "--out", str(tmp_path / "s.json")
    )
    assert code == 0 and "perplexity baseline" in out and "model.layers.3" in out
    scan = json.loads((tmp_path / "s.json").read_text())
    assert len(scan["head_drop"]) == 4 and len(scan["head_drop"][0]) == 2

    out_dir = tmp_path / "pruned"
    code, out, _ = run(
        capsys, "prune", "--model", str(folder), *common, "--target-params", "0.75",
        "--scan", str(tmp_path / "s.json"), "--out", str(out_dir), "--no-speed-check", "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["params_after"] <= 0.75 * summary["params_before"] * 1.02
    assert summary["quality_after"]["perplexity"] > 0
    pruned = load_model(str(out_dir))
    assert sum(p.numel() for p in pruned.module.parameters()) == summary["params_after"]

    code, out, _ = run(capsys, "eval", "--model", str(out_dir), *common, "--json")
    assert code == 0
    assert json.loads(out)["perplexity"] == pytest.approx(
        summary["quality_after"]["perplexity"], rel=1e-4
    )

    tuned = tmp_path / "tuned"
    code, out, _ = run(
        capsys, "finetune", "--model", str(out_dir), "--teacher", str(folder), *common,
        "--epochs", "1", "--out", str(tuned), "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["perplexity_before"] == pytest.approx(
        summary["quality_after"]["perplexity"], rel=1e-3
    )
    assert result["perplexity_after"] is not None
    assert load_model(str(tuned)).module.hf.config.num_hidden_layers == 4


def test_prune_to_onnx_keeps_dynamic_batch_and_sequence(capsys, llama, tmp_path):
    folder, text = llama
    path = tmp_path / "p.onnx"
    code, _, err = run(
        capsys, "prune", "--model", str(folder), "--ratio", "0.5", "--out", str(path),
        "--seq-len", "32", "--no-speed-check",
    )  # fmt: skip
    assert code == 0, err
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input_ids"
    ids = np.random.default_rng(0).integers(0, hf_zoo.VOCAB, size=(3, 21), dtype=np.int64)
    (logits,) = sess.run(None, {"input_ids": ids})
    assert logits.shape == (3, 21, hf_zoo.VOCAB)


def test_one_line_errors(capsys, llama, tmp_path):
    folder, text = llama
    code, _, err = run(capsys, "info", "--model", "Qwen/Qwen2.5-0.5B")
    assert code != 0 and "never downloads from a model hub" in err and err.count("\n") == 1
    code, _, err = run(capsys, "eval", "--model", "demo", "--data", str(text))
    assert code != 0 and "goes with a language model" in err
    code, _, err = run(
        capsys, "prune", "--model", str(folder), "--ratio", "0.5", "--out", str(tmp_path / "x.pt")
    )
    assert code != 0 and "Hugging Face folder" in err
    assert not (tmp_path / "x.pt").exists()


def test_depth_pruning_by_ratio_drops_the_least_sensitive_layers(capsys, llama, tmp_path):
    folder, text = llama
    out_dir = tmp_path / "shallow"
    code, out, err = run(
        capsys, "prune", "--model", str(folder), "--data", str(text), "--seq-len", "32",
        "--method", "blocks", "--ratio", "0.5", "--out", str(out_dir), "--no-speed-check",
    )  # fmt: skip
    assert code == 0, err
    model = load_model(str(out_dir))
    assert model.module.hf.config.num_hidden_layers == 2
    with torch.no_grad():
        assert model.module(model.example_input()).shape[-1] == hf_zoo.VOCAB
