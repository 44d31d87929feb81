from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from studio.cli import main
from studio.core import zoo


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_lists_every_layer_and_adds_up(capsys) -> None:
    code, out, _ = run(capsys, "info", "--model", "demo", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["input_shape"] == [1, 1, 32, 32]
    model = zoo.build("resnet20")
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear))
    }
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert expected <= set(layers)
    for layer in layers.values():
        assert {"name", "type", "params", "macs", "prunable", "group", "reason"} <= set(layer)
    assert info["params"] == sum(layer["params"] for layer in info["layers"])
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["macs"] == sum(layer["macs"] for layer in info["layers"])
    # residual blocks: the second conv of every block in a stage shares one group
    stage1 = [name for name in layers if name.endswith("conv2") and layers[name]["macs"]]
    groups = {layers[name]["group"] for name in stage1}
    assert None not in groups and len(groups) == 3  # one shared group per stage


def test_info_table(capsys) -> None:
    code, out, _ = run(capsys, "info", "--model", "zoo:vgg11")
    assert code == 0 and "features.0" in out and "total:" in out


def test_eval_demo_reaches_97_percent(capsys) -> None:
    code, out, _ = run(capsys, "eval", "--model", "demo", "--data", "demo", "--json")
    result = json.loads(out)
    assert code == 0 and result["samples"] == 360 and result["accuracy"] >= 0.97
    assert 0 < result["loss"] < 0.2


def test_eval_fidelity_on_unlabeled_data(capsys, tmp_path) -> None:
    x = np.random.default_rng(1).normal(size=(40, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    code, out, _ = run(
        capsys,
        "eval",
        "--model",
        "demo",
        "--data",
        str(tmp_path / "calib.npz"),
        "--reference",
        "demo",
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["agreement"] == 1.0 and result["kl"] < 1e-6
    assert result["accuracy"] is None
    code, out, _ = run(
        capsys,
        "eval",
        "--model",
        "zoo:resnet20",
        "--data",
        str(tmp_path / "calib.npz"),
        "--reference",
        "demo",
        "--json",
    )
    assert json.loads(out)["agreement"] < 0.9


@pytest.mark.parametrize(
    "name, content",
    [
        ("random.pt", os.urandom(4096)),
        ("text.pt", b"this is just a text file\n"),
        ("text.onnx", b"hello, I am not a graph\n"),
        ("empty.pth", b""),
    ],
)
def test_bad_model_files_give_one_line_error(capsys, tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    code, out, err = run(capsys, "info", "--model", str(path))
    assert code != 0 and out == ""
    assert err.startswith("studio: error:") and err.count("\n") == 1 and name in err
    assert path.read_bytes() == content


def test_truncated_model_file(capsys, tmp_path) -> None:
    full = tmp_path / "full.pt"
    torch.save(zoo.build("resnet20").state_dict(), full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    code, _, err = run(capsys, "info", "--model", str(cut), "--arch", "resnet20")
    assert code != 0 and err.count("\n") == 1 and "cut.pt" in err


def test_state_dict_with_arch(capsys, tmp_path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(zoo.build("vgg11").state_dict(), path)
    code, _, err = run(capsys, "info", "--model", str(path))
    assert code != 0 and "--arch" in err
    code, out, _ = run(capsys, "info", "--model", str(path), "--arch", "vgg11", "--json")
    assert code == 0 and json.loads(out)["params"] == sum(
        p.numel() for p in zoo.build("vgg11").parameters()
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["info", "--model", "does/not/exist.pt"], "exist.pt"),
        (["info", "--model", "zoo:alexnet"], "resnet20"),
        (["info", "--model", "zoo:resnet20", "--input-shape", "1,a,3"], "input shape"),
        (["eval", "--model", "demo", "--data", "nowhere"], "data not found"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, needle) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 1 and err.count("\n") == 1 and needle in err


def test_entry_point_subprocess_exit_codes(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    done = subprocess.run(
        [sys.executable, "-m", "studio", "info", "--model", str(bad)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
