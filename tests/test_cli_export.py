"""``studio export``: JSON summary, INT8 on top, one-line errors, input files left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.core.models.load import load_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets, save_pruned


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pruned_pt(tmp_path_factory) -> Path:
    """The demo pruned by 30% per group, saved as the studio's .pt."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one_thread
    demo = load_model("demo")
    plan = PruningPlan("structured", ratios=dict.fromkeys(prune_targets(demo, "structured"), 0.3))
    path = tmp_path_factory.mktemp("cli_export") / "pruned.pt"
    save_pruned(prune(demo, plan), path)
    torch.set_num_threads(previous)
    return path


def test_export_onnx_json(capsys, tmp_path: Path, pruned_pt: Path) -> None:
    out = tmp_path / "p.onnx"
    code, stdout, _ = run(
        capsys, "export", "--model", str(pruned_pt), "--format", "onnx", "--out", str(out),
        "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary["path"] == str(out) and summary["format"] == "onnx"
    assert summary["bytes"] == out.stat().st_size
    assert summary["params"] == summary["params_model"] < 272_186  # the demo has 272,186
    assert summary["max_abs_diff"] <= 1e-4 * max(1.0, summary["output_scale"])
    assert summary["ort_ms_original"] > 0 and summary["ort_ms_exported"] > 0
    assert summary["original"] == "resnet20 (unpruned architecture)"


def test_export_with_static_int8(capsys, tmp_path: Path, pruned_pt: Path) -> None:
    out = tmp_path / "p.onnx"
    code, stdout, _ = run(
        capsys, "export", "--model", str(pruned_pt), "--format", "onnx", "--out", str(out),
        "--quantize", "static", "--data", "demo", "--no-latency",
    )  # fmt: skip
    assert code == 0, stdout
    assert "INT8 (static, 256 calibration samples)" in stdout
    assert "accuracy" in stdout and (tmp_path / "p.int8.onnx").exists()
    code, stdout, _ = run(
        capsys, "export", "--model", str(pruned_pt), "--format", "onnx", "--out", str(out),
        "--quantize", "dynamic", "--data", "demo", "--unlabeled", "--no-latency", "--json",
    )  # fmt: skip
    summary = json.loads(stdout)
    assert summary["bytes_int8"] < summary["bytes_float"] / 2.5
    assert summary["accuracy_int8"] is None and summary["agreement_int8"] >= 0.9


def test_export_torchscript_text(capsys, tmp_path: Path) -> None:
    out = tmp_path / "m.ts"
    code, stdout, _ = run(
        capsys, "export", "--model", "zoo:vgg11", "--format", "torchscript", "--out", str(out)
    )
    assert code == 0 and out.exists()
    assert "largest difference" in stdout and "parameters" in stdout


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--format", "onnx", "--out", "x.pt"], "--out of a onnx export must end in .onnx"),
        (["--format", "torchscript", "--out", "x.pt", "--opset", "17"], "--opset goes with"),
        (["--format", "pt2", "--out", "x.pt2", "--quantize", "dynamic"], "--quantize works on"),
        (["--format", "onnx", "--out", "x.onnx", "--quantize", "static"], "calibration data"),
        (["--format", "onnx", "--out", "x.onnx", "--opset", "99"], "opset 99 is not supported"),
    ],
)
def test_bad_arguments_are_one_line(capsys, tmp_path: Path, monkeypatch, extra, needle) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "export", "--model", "zoo:vgg11", *extra)
    assert code == 1 and needle in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_never_writes_over_the_input_model(capsys, tmp_path: Path) -> None:
    source = tmp_path / "m.pt2"
    code, _, _ = run(
        capsys, "export", "--model", "zoo:vgg11", "--format", "pt2", "--out", str(source)
    )
    assert code == 0
    before = source.read_bytes()
    code, _, err = run(
        capsys, "export", "--model", str(source), "--format", "pt2", "--out", str(source)
    )
    assert code == 1 and "refusing to write over m.pt2" in err
    assert source.read_bytes() == before
