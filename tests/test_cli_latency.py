"""``studio latency`` and ``studio prune --target-latency``: JSON keys, labels, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from studio.cli import main
from studio.core.latency import fit as latency_fit
from studio.core.latency import measure as latency_measure
from studio.core.latency.measure import measure_latency

SMALL = ("--model", "zoo:resnet20", "--input-shape", "1,1,8,8")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(latency_fit, "FIT_RANDOM", 1)
    monkeypatch.setattr(latency_fit, "FIT_PASSES", 1)
    monkeypatch.setattr(latency_fit, "FIT_SECONDS", 0.0)
    monkeypatch.setattr(latency_fit, "FIT_ROUNDED", 1)
    yield
    torch.set_num_threads(previous)


def test_latency_json_measured_and_device(capsys):
    code, out, _ = run(
        capsys, "latency", "--model", "demo", "--threads", "1", "--budget", "0.3",
        "--device", "rpi4-cortex-a72", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    for key in ("runtime", "batch", "threads", "median_ms", "p10_ms", "p90_ms", "throughput"):
        assert key in data
    assert 0 < data["quiet_ms"] <= data["p90_ms"]
    assert data["label"] == "measured" and data["runtime"] == "onnxruntime"
    assert data["layers"] and {"name", "ms"} <= set(data["layers"][0])
    assert "layers.0.conv1" in {layer["name"] for layer in data["layers"]}
    assert data["device"] == "rpi4-cortex-a72" and data["estimated_label"] == "estimated"
    assert data["estimated_ms"] > 0 and data["energy_mj"] > 0
    assert {row["bound"] for row in data["device_layers"]} <= {"compute", "memory"}


def test_latency_predict_text(capsys):
    code, out, _ = run(
        capsys, "latency", *SMALL, "--threads", "1", "--budget", "0.2", "--predict", "--per-layer",
    )  # fmt: skip
    assert code == 0
    assert "measured   median" in out and "estimated " in out and "per layer (measured" in out
    assert "by the table alone" in out and "unpruned   median" not in out


def test_latency_predict_json_anchors_to_the_measured_model(capsys):
    code, out, _ = run(
        capsys, "latency", *SMALL, "--threads", "1", "--budget", "0.2", "--predict", "--json"
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    # without a recipe the measured model is the unpruned one: it is its own anchor
    assert data["anchored"] and data["original_quiet_ms"] == data["quiet_ms"]
    assert data["predicted_ms"] == pytest.approx(data["quiet_ms"], rel=1e-9)
    assert data["prediction_error_quiet"] == pytest.approx(0.0, abs=1e-9)
    assert data["table_ms"] * data["anchor"] == pytest.approx(data["predicted_ms"], rel=1e-9)


def test_latency_predict_recipe_json(capsys, tmp_path, monkeypatch):
    recipe = tmp_path / "plan.yaml"
    code, _, _ = run(
        capsys, "prune", *SMALL, "--target-latency", "0.8", "--threads", "1",
        "--out", str(tmp_path / "p.pt"), "--recipe-out", str(recipe), "--json",
    )  # fmt: skip
    assert code == 0
    target = yaml.safe_load(recipe.read_text())["target"]
    assert target["kind"] == "latency" and target["fraction"] == 0.8
    assert target["runtime"] == "onnxruntime" and target["predicted_ms"] > 0
    # zoo models load with fresh random weights: let the recipe apply to any of them
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(dict(data, model_fingerprint="")))
    sizes = []  # parameters of each model measured

    def spy(model, *args, **kwargs):
        sizes.append(sum(p.numel() for p in model.module.parameters()))
        return measure_latency(model, *args, **kwargs)

    monkeypatch.setattr(latency_measure, "measure_latency", spy)
    code, out, _ = run(
        capsys, "latency", *SMALL, "--threads", "1", "--budget", "0.2", "--recipe", str(recipe),
        "--device", "sparse-accelerator", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["predicted_ms"] > 0 and data["predicted_label"] == "estimated"
    assert "prediction_error" in data and data["estimated_ms"] > 0
    # anchored to the unpruned model measured in this run (side by side with the pruned one)
    assert data["anchored"] and data["original_quiet_ms"] > 0 and data["original_median_ms"] > 0
    assert data["predicted_original_ms"] == pytest.approx(data["original_quiet_ms"], rel=1e-9)
    assert data["table_ms"] * data["anchor"] == pytest.approx(data["predicted_ms"], rel=1e-9)
    errors = {"prediction_error": "median_ms", "prediction_error_quiet": "quiet_ms"}
    for key, measured in errors.items():
        assert data[key] == pytest.approx(data["predicted_ms"] / data[measured] - 1.0)
    assert data["table_error_quiet"] == pytest.approx(data["table_ms"] / data["quiet_ms"] - 1.0)
    # the pruned model measured first, then the unpruned one for the anchor
    assert len(sizes) == 2 and sizes[0] < sizes[1]


def test_latency_errors_are_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "latency", "--model", "demo", "--device", "no-such-device")
    assert code == 1 and err.count("\n") == 1 and "no device profile" in err
    bad = tmp_path / "dev.yaml"
    bad.write_text("name: x\n")
    code, _, err = run(capsys, "latency", "--model", "demo", "--device", str(bad))
    assert code == 1 and err.count("\n") == 1 and "dev.yaml" in err
    code, _, err = run(capsys, *("prune", *SMALL, "--target-latency", "fast", "--out", "x.pt"))
    assert code == 1 and "--target-latency" in err


def test_list_devices_json(capsys):
    code, out, _ = run(capsys, "latency", "--list-devices", "--json")
    assert code == 0
    names = {p["name"] for p in json.loads(out)}
    assert {"rpi4-cortex-a72", "jetson-orin-nano", "a100", "coral-edge-tpu"} <= names
