"""``studio finetune``: the JSON summary agrees with ``studio eval`` of the saved model, the
history CSV, distillation on unlabeled data, gradual pruning by a recipe, a continued run,
``--ray local --workers 2`` on the pruned demo as accurate as in-process training, and
one-line errors (exit 1) for bad input before any work."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from studio.cli import main
from studio.core.cluster.connection import INSTALL_HINT, Cluster
from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.models.pruned_file import save_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small demo subsets as .npz files and the demo model saved as a .pt file."""
    folder = tmp_path_factory.mktemp("finetune")
    train, val = demo_splits()
    paths = {"train": folder / "train.npz", "val": folder / "val.npz", "model": folder / "m.pt"}
    np.savez(paths["train"], x=train.x[:96].numpy(), y=train.y[:96].numpy())
    np.savez(paths["val"], x=val.x[:64].numpy(), y=val.y[:64].numpy())
    save_model(load_model("demo"), paths["model"])
    return paths


def test_finetune_json_matches_eval_of_the_saved_model(capsys, tmp_path, files) -> None:
    out, history = tmp_path / "ft.pt", tmp_path / "h.csv"
    code, stdout, err = run(
        capsys,
        "finetune",
        "--model", str(files["model"]),
        "--data", str(files["train"]),
        "--val-data", str(files["val"]),
        "--teacher", "demo",
        "--epochs", "2",
        "--batch-size", "32",
        "--threads", "1",
        "--out", str(out),
        "--history", str(history),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert {"epochs_run", "best_epoch", "accuracy_before", "accuracy_after", "seconds"} <= set(
        summary
    )
    assert summary["epochs_run"] == 2 and summary["best_epoch"] in (1, 2)
    assert summary["sparsity"] == 0.0 and summary["seconds"] > 0
    code, stdout, err = run(
        capsys, "eval", "--model", str(out), "--data", str(files["val"]), "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] == pytest.approx(summary["accuracy_after"])
    code, stdout, _ = run(capsys, "info", "--model", str(out), "--json")
    assert code == 0 and json.loads(stdout)["params"] == summary["params"]
    rows = list(csv.DictReader(history.open()))
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and sum(r["kind"] == "step" for r in rows) >= 2 * 3
    assert [r["is_best"] for r in epochs].count("True") >= 1


def test_an_onnx_model_is_fine_tuned_and_saved_as_onnx(capsys, tmp_path, files) -> None:
    source, out = tmp_path / "demo.onnx", tmp_path / "ft.onnx"
    save_model(load_model("demo"), source)
    code, stdout, err = run(
        capsys,
        "finetune",
        "--model", str(source),
        "--data", str(files["train"]),
        "--val-data", str(files["val"]),
        "--epochs", "1",
        "--batch-size", "32",
        "--threads", "1",
        "--out", str(out),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    code, stdout, err = run(
        capsys, "eval", "--model", str(out), "--data", str(files["val"]), "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] == pytest.approx(summary["accuracy_after"], abs=1 / 64)
    assert onnx.load(str(out)).graph.input[0].name == onnx.load(str(source)).graph.input[0].name


def test_unlabeled_distillation_and_a_continued_run(capsys, tmp_path, files) -> None:
    args = [
        "finetune",
        "--model", str(files["model"]),
        "--data", str(files["train"]),
        "--unlabeled",
        "--teacher", "demo",
        "--batch-size", "32",
        "--threads", "1",
        "--checkpoint-dir", str(tmp_path / "ck"),
        "--out", str(tmp_path / "ft.pt"),
        "--json",
    ]  # fmt: skip
    code, stdout, err = run(capsys, *args, "--epochs", "1")
    assert code == 0, err
    first = json.loads(stdout)
    assert first["accuracy_before"] is None and first["accuracy_after"] is None
    assert 0.0 <= first["agreement_before"] <= 1.0 and first["agreement_after"] is not None
    code, _, err = run(capsys, *args, "--epochs", "2")  # other settings: refused
    assert code == 1 and "other settings" in err
    code, _, err = run(capsys, *args[:-1], "--epochs", "1")  # the same run: nothing to redo
    assert code == 0, err
    assert "continuing from epoch 1" in _


def test_gradual_pruning_by_a_recipe(capsys, tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=generator)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=(x.mean((1, 2, 3)) > 0).long().numpy())
    student = load_model("zoo:resnet20", input_shape=(1, 1, 8, 8))
    names = prune_targets(student, "structured")
    plan = PruningPlan("structured", ratios={n: 0.5 for n in names[:4]})
    plan.save(tmp_path / "r.yaml")
    code, stdout, err = run(
        capsys,
        "finetune",
        "--model", "zoo:resnet20",
        "--input-shape", "1,1,8,8",
        "--data", str(tmp_path / "d.npz"),
        "--gradual", "--recipe", str(tmp_path / "r.yaml"), "--steps", "2",
        "--epochs", "1",
        "--batch-size", "16",
        "--threads", "1",
        "--out", str(tmp_path / "g.pt"),
    )  # fmt: skip
    assert code == 0, err
    assert "plan 100%" in stdout and "saved" in stdout
    want = prune(student, plan).params_after
    code, stdout, _ = run(capsys, "info", "--model", str(tmp_path / "g.pt"), "--json")
    assert code == 0 and json.loads(stdout)["params"] == want


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "{model}"], "refusing to write over"),
        (["--out", "{tmp}/x.tflite"], "--out must end in .pt"),
        (["--out", "{tmp}/x.pt", "--gradual"], "--gradual needs --recipe"),
        (["--out", "{tmp}/x.pt", "--steps", "3"], "go with --gradual"),
        (["--out", "{tmp}/x.pt", "--history", "{tmp}/h.txt"], "--history must end in .csv"),
        (["--out", "{tmp}/x.pt", "--epochs", "0"], "epochs must be 1 or more"),
        (["--out", "{tmp}/x.pt", "--distill-weight", "2"], "distillation weight"),
        (["--out", "{tmp}/x.pt", "--unlabeled"], "no labels: give a teacher"),
        (["--out", "{tmp}/x.pt", "--val-data", "{tmp}/none.npz"], "data not found"),
        (["--out", "{tmp}/x.pt", "--workers", "2"], "--workers goes with --ray"),
        (["--out", "{tmp}/x.pt", "--ray", "somewhere"], "is not a Ray address"),
        (["--out", "{tmp}/x.pt", "--ray", "local", "--workers", "0"], "--workers must be 1"),
        (["--out", "{tmp}/x.pt", "--ray", "local", "--checkpoint-dir", "{tmp}/c"], "no checkpoint"),
    ],
)
def test_errors_are_one_line(capsys, tmp_path, files, extra: list[str], message: str) -> None:
    values = {"model": files["model"], "tmp": tmp_path}
    argv = ["finetune", "--model", str(files["model"]), "--data", str(files["train"])]
    argv += [a.format(**values) for a in extra]
    before = files["model"].read_bytes()
    code, stdout, err = run(capsys, *argv)
    assert code == 1 and message in err and stdout == ""
    assert err.count("\n") == 1 and err.startswith("studio: error:")
    assert files["model"].read_bytes() == before
    assert not (tmp_path / "x.pt").exists()


def test_ray_without_ray_installed_names_the_install_command(capsys, tmp_path, files, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    argv = ["finetune", "--model", str(files["model"]), "--data", str(files["train"])]
    code, stdout, err = run(capsys, *argv, "--ray", "local", "--out", str(tmp_path / "x.pt"))
    assert code == 1 and stdout == "" and err.count("\n") == 1
    assert "Ray is not installed" in err and INSTALL_HINT in err


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module's Ray runs (the CLI joins it: same address)."""
    pytest.importorskip("ray")
    yield Cluster.connect("local")
    Cluster.shutdown()


def test_ray_finetune_of_the_pruned_demo_matches_in_process(capsys, tmp_path, ray_local):
    pruned = tmp_path / "pruned.pt"
    code, _, err = run(
        capsys,
        "prune", "--model", "demo", "--data", "demo", "--calib-data", "demo:train",
        "--target-macs", "0.5", "--allocate", "uniform", "--out", str(pruned),
    )  # fmt: skip
    assert code == 0, err
    args = ["finetune", "--model", str(pruned), "--data", "demo:train", "--teacher", "demo"]
    args += ["--epochs", "2"]
    code, stdout, err = run(capsys, *args, "--threads", "1", "--out", str(tmp_path / "a.pt"),
                            "--json")  # fmt: skip
    assert code == 0, err
    alone = json.loads(stdout)
    code, stdout, err = run(capsys, *args, "--ray", "local", "--workers", "2",
                            "--out", str(tmp_path / "b.pt"))  # fmt: skip
    assert code == 0, err
    assert (
        stdout.startswith("running on local Ray at 127.0.0.1:") and "2 training workers" in stdout
    )
    assert "epoch 2/2" in stdout and "saved" in stdout
    code, stdout, err = run(capsys, "eval", "--model", str(tmp_path / "b.pt"), "--data", "demo",
                            "--json")  # fmt: skip
    assert code == 0, err
    on_ray = json.loads(stdout)["accuracy"]
    assert alone["accuracy_before"] < 0.9
    assert abs(on_ray - alone["accuracy_after"]) <= 0.01, (on_ray, alone["accuracy_after"])
