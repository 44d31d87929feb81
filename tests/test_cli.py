from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from studio.cli import main
from studio.core.models import zoo
from studio.core.models.load import load_model


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


# ---- studio prune -------------------------------------------------------------------------


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_prune_saves_a_model_that_info_and_eval_load(capsys, tmp_path, one_thread) -> None:
    out, recipe = tmp_path / "pruned.pt", tmp_path / "recipe.yaml"
    code, stdout, _ = run(
        capsys,
        *("prune", "--model", "demo", "--data", "demo", "--method", "structured"),
        *("--ratio", "0.5", "--out", str(out), "--recipe-out", str(recipe), "--json"),
    )
    assert code == 0
    result = json.loads(stdout)
    assert {"params_before", "params_after", "macs_before", "macs_after", "skipped"} <= set(result)
    assert result["params_after"] < 0.3 * result["params_before"]
    assert result["macs_after"] < 0.3 * result["macs_before"]
    assert result["quality_before"]["accuracy"] > 0.97 and result["skipped"] == []
    assert result["out"] == str(out) and result["seconds"] > 0
    # the saved model loads back without --trust-pickle, with the numbers prune reported
    code, stdout, _ = run(capsys, "info", "--model", str(out), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["params"] == result["params_after"]
    assert info["macs"] == result["macs_after"]
    code, stdout, _ = run(capsys, "eval", "--model", str(out), "--data", "demo", "--json")
    evaluated = json.loads(stdout)
    assert code == 0
    assert evaluated["accuracy"] == pytest.approx(result["quality_after"]["accuracy"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(result["quality_after"]["loss"], rel=1e-5)
    # the recipe replays to the same weights (and batch-norm statistics, on the same data)
    again = tmp_path / "again.pt"
    code, _, _ = run(
        capsys,
        *("prune", "--model", "demo", "--data", "demo", "--recipe", str(recipe)),
        *("--out", str(again)),
    )
    first, second = _state(out), _state(again)
    assert code == 0 and first.keys() == second.keys()
    assert all(first[k].equal(second[k]) for k in first)


def test_prune_to_a_macs_target(capsys, tmp_path, one_thread) -> None:
    code, stdout, _ = run(
        capsys,
        *("prune", "--model", "demo", "--target-macs", "0.5", "--allocate", "uniform"),
        *("--out", str(tmp_path / "half.pt"), "--json"),
    )
    result = json.loads(stdout)
    assert code == 0 and 0.48 <= result["macs_after"] / result["macs_before"] <= 0.52
    code, stdout, _ = run(
        capsys,
        *("prune", "--model", "demo", "--ratio", "0.3", "--round-to", "8"),
        *("--out", str(tmp_path / "r8.pt"), "--json"),
    )
    assert code == 0 and json.loads(stdout)["params_after"] < 272_186
    convs = [
        m for m in load_model(str(tmp_path / "r8.pt")).module.modules() if hasattr(m, "groups")
    ]
    assert convs and all(conv.out_channels % 8 == 0 for conv in convs)


def test_prune_unstructured_and_blocks_text_output(capsys, tmp_path, one_thread) -> None:
    sparse = tmp_path / "sparse.pt"
    code, stdout, _ = run(
        capsys,
        *("prune", "--model", "demo", "--method", "unstructured", "--ratio", "0.8"),
        *("--out", str(sparse)),
    )
    assert code == 0 and "sparsity     80.0%" in stdout and f"saved {sparse}" in stdout
    code, stdout, _ = run(capsys, "info", "--model", str(sparse), "--json")
    layers = {layer["name"]: layer for layer in json.loads(stdout)["layers"]}
    assert layers["layers.4.conv2"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    code, stdout, _ = run(
        capsys,
        *("prune", "--model", "demo", "--method", "blocks", "--ratio", "0.5"),
        *("--out", str(tmp_path / "short.pt"), "--json"),
    )
    result = json.loads(stdout)
    assert code == 0 and result["targets"] == 4  # 4 of the 9 blocks
    code, stdout, _ = run(capsys, "info", "--model", str(tmp_path / "short.pt"), "--json")
    assert code == 0 and json.loads(stdout)["params"] == result["params_after"]


def test_prune_errors_are_one_line(capsys, tmp_path, one_thread) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratios: [1\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: structured\nratios: {nowhere: 0.5}\n")
    out = ("--out", str(tmp_path / "o.pt"))
    cases = [
        (["--model", "missing.pt", "--ratio", "0.5", *out], "does not exist"),
        (["--model", "demo", "--recipe", str(bad), *out], "not valid YAML"),
        (["--model", "demo", "--recipe", str(unknown), *out], "does not have"),
        (["--model", "demo", "--recipe", str(bad), "--ratio", "0.5", *out], "leave out --ratio"),
        (["--model", "demo", "--recipe", str(bad), "--round-to", "8", *out], "--round-to"),
        (["--model", "demo", *out], "say how much to prune"),
        (["--model", "demo", "--ratio", "0.5", "--out", "x.tflite"], "--out must end"),
        (["--model", "demo", "--ratio", "0.95", *out], "above the per-layer cap"),
        (["--model", "demo", "--criterion", "taylor", "--ratio", "0.5", *out], "needs data"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, "prune", *argv)
        assert code == 1 and err.count("\n") == 1 and needle in err, (argv, err)
    assert not (tmp_path / "o.pt").exists()


def test_scan_on_ray_without_ray_names_the_install_command(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    code, _, err = run(capsys, "scan", "--model", "demo", "--data", "demo", "--ray", "local")
    assert code == 1
    assert err.count("\n") == 1 and "Ray is not installed" in err
    assert "bash packaging/install.sh --ray" in err


def test_scan_rejects_a_bad_ray_address_and_worker_count(capsys) -> None:
    code, _, err = run(capsys, "scan", "--model", "demo", "--data", "demo", "--ray", "head")
    assert code == 1 and "'head' is not a Ray address" in err
    code, _, err = run(capsys, "scan", "--model", "demo", "--data", "demo", "--workers", "0")
    assert code == 1 and "workers must be at least 1" in err


def test_dynamic_onnx_input_shape_comes_from_the_data(capsys, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 4),
    ).eval()  # fmt: skip
    path = tmp_path / "dynamic.onnx"
    torch.onnx.export(
        net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((12, 3, 20, 24)).astype(np.float32),
             y=rng.integers(0, 4, 12))  # fmt: skip
    before = path.read_bytes()
    code, out, err = run(capsys, "eval", "--model", str(path), "--data", str(data), "--json")
    assert code == 0, err
    assert json.loads(out)["samples"] == 12
    assert "input shape 1,3,20,24 from --data" in err
    code, _, err = run(capsys, "info", "--model", str(path))  # no data: the shape is asked for
    assert code != 0 and "--input-shape" in err
    code, _, err = run(capsys, "eval", "--model", str(path), "--data", str(data),
                       "--input-shape", "1,3,20,24", "--json")  # fmt: skip
    assert code == 0 and "from --data" not in err
    assert path.read_bytes() == before
