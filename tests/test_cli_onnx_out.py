"""``studio prune --model X.onnx ... --out P.onnx``: an ONNX file in, an ONNX file out, with the
original's names, dynamic dims and opset; one line and no file when the file cannot be checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from studio.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_onnx(module: nn.Module, path: Path, opset: int = 18) -> Path:
    torch.onnx.export(
        module.eval(), (torch.randn(1, 3, 32, 32),), str(path), dynamo=False,
        opset_version=opset, input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}},
    )  # fmt: skip
    return path


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )  # fmt: skip


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_prune_onnx_to_onnx(capsys, tmp_path: Path) -> None:
    source = write_onnx(cnn(), tmp_path / "x.onnx")
    before = source.read_bytes()
    out = tmp_path / "p.onnx"
    code, stdout, err = run(
        capsys, "prune", "--model", str(source), "--ratio", "0.3", "--method", "structured",
        "--out", str(out), "--input-shape", "1,3,32,32", "--no-speed-check",
    )  # fmt: skip
    assert code == 0, err
    assert f"saved {out}" in stdout
    assert source.read_bytes() == before
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert dims(model.graph.input[0]) == ["batch", 3, "h", "w"]
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert out.stat().st_size < source.stat().st_size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 40, 48)).astype(np.float32)
    assert sess.run(None, {"images": x})[0].shape == (3, 5)
    # the file opens in the studio again, pruned
    code, stdout, err = run(capsys, "info", "--model", str(out), "--input-shape", "1,3,32,32",
                            "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["params"] < sum(p.numel() for p in cnn().parameters())


def test_an_opset_torch_cannot_write_is_said_on_stderr(capsys, tmp_path: Path) -> None:
    source = write_onnx(cnn(), tmp_path / "x.onnx")
    model = onnx.load(str(source))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 21  # the graph's ops are the same at 21
    onnx.save(model, str(source))
    out = tmp_path / "p.onnx"
    code, stdout, err = run(
        capsys, "prune", "--model", str(source), "--ratio", "0.3", "--out", str(out),
        "--input-shape", "1,3,32,32", "--no-speed-check", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert "note: the original file uses opset 21" in err and "written with opset 20" in err
    summary = json.loads(stdout)
    assert summary["out"] == str(out) and any("opset 21" in n for n in summary["notes"])
    written = onnx.load(str(out))
    assert [o.version for o in written.opset_import if o.domain in ("", "ai.onnx")] == [20]


def test_a_file_that_fails_its_check_is_not_written(capsys, tmp_path: Path) -> None:
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))
    source = write_onnx(flat, tmp_path / "flat.onnx")  # says h, w are dynamic; only 32 runs
    code, _, err = run(
        capsys, "prune", "--model", str(source), "--ratio", "0.3", "--out",
        str(tmp_path / "p.onnx"), "--input-shape", "1,3,32,32", "--no-speed-check",
    )  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("studio: error:")]
    assert code == 1 and len(errors) == 1 and err.endswith(errors[0] + "\n")  # one line
    assert "(1, 3, 64, 64)" in errors[0] and "nothing was written" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.onnx"]


def test_help_names_onnx(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "MODEL.onnx" in capsys.readouterr().out
