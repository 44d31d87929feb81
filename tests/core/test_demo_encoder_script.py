"""packaging/train_demo_encoder.py, run for two steps: it writes a sentence-transformers folder
that the studio loads as an encoder (mean-pooled, normalised embedding) with every weight in the
file, a BERT tokenizer whose windows start with [CLS], and training.json with the figures."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from studio.core.models.load import load_model
from studio.core.models.text import load_text_data
from studio.core.paths import RESOURCES

SCRIPT = RESOURCES.parent / "packaging" / "train_demo_encoder.py"


def test_two_steps_write_a_folder_the_studio_loads_as_an_encoder(tmp_path):
    out = tmp_path / "enc"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "2", "--eval-every", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["enc"]  # no staging folder left
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 2 and len(info["val_curve"]) == 1
    assert 0 <= info["val_masked_accuracy"] <= 1 and info["saved_state_max_difference"] < 0.1
    assert (out / "LICENSE-corpus.txt").read_text().startswith("corpus.txt in this folder")
    assert "train_demo_encoder.py" in (out / "LICENSE-corpus.txt").read_text()

    model = load_model(str(out))
    assert model.task == "embedding" and model.tokenizer.mask_token == "[MASK]"
    hf = model.module.hf
    assert hf.config.num_attention_heads == 8 and hf.config.num_hidden_layers == 4
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k.removeprefix("bert.") for k in f.keys()}
    assert stored == set(hf.state_dict()) - {"embeddings.position_ids"}
    splits = load_text_data(out / "corpus.txt", model.tokenizer, 128)
    assert (splits.validation.x[:, 0] == model.tokenizer.cls_token_id).all()
    with torch.no_grad():
        emb = model.module(splits.validation.x[:4])
    assert emb.shape == (4, 256)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
