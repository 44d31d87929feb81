"""INT8 on top of pruning: the pruned demo, exported to ONNX, quantized dynamically and
statically; smaller, nearly as accurate, written atomically and never over the float file."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from studio.core.errors import StudioError
from studio.core.export.exporter import export_model
from studio.core.export.quantize import int8_path, quantize_onnx
from studio.core.models.data import DataSet, demo_splits
from studio.core.models.load import load_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory) -> Path:
    """The demo, pruned by 30% per group (BN re-estimated on training data), as ONNX."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    demo = load_model("demo")
    plan = PruningPlan("structured", ratios=dict.fromkeys(prune_targets(demo, "structured"), 0.3))
    train = demo_splits()[0]
    model = prune(demo, plan, calibration=train.subset(512)).model
    path = tmp_path_factory.mktemp("quantize") / "pruned.onnx"
    export_model(model, "onnx", path, measure_latency=False)
    torch.set_num_threads(previous)
    return path


@pytest.fixture(scope="module")
def val() -> DataSet:
    return demo_splits()[1].subset(200)


@pytest.fixture(scope="module")
def calibration() -> DataSet:
    return demo_splits()[0].subset(64)


def ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_static_int8_is_smaller_and_as_accurate(float_onnx, val, calibration) -> None:
    out = int8_path(float_onnx)
    result = quantize_onnx(float_onnx, out, "static", val, calibration, latency_budget_s=0.05)
    assert out.name == "pruned.int8.onnx" and result.path == out
    assert result.bytes_int8 == out.stat().st_size < result.bytes_float / 2.5
    assert result.calibration_samples == 64 and result.samples == 200
    assert result.accuracy_float is not None and result.accuracy_float > 0.8
    assert result.accuracy_int8 is not None
    assert result.accuracy_int8 >= result.accuracy_float - 0.03
    assert result.agreement_int8 is not None and result.agreement_int8 >= 0.9
    assert result.ort_ms_float and result.ort_ms_int8
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: val.x[:3].numpy()})[0].shape == (
        3,
        10,
    )
    summary = result.to_dict()
    for key in ("bytes_float", "bytes_int8", "accuracy_float", "accuracy_int8"):
        assert summary[key] is not None
    assert [p.name for p in float_onnx.parent.iterdir() if ".tmp" in p.name] == []


def test_dynamic_int8_on_convolutions(float_onnx, val, tmp_path: Path) -> None:
    out = tmp_path / "dynamic.onnx"
    result = quantize_onnx(float_onnx, out, "dynamic", val, latency_budget_s=0.02)
    assert result.bytes_int8 < result.bytes_float / 2.5 and result.calibration_samples == 0
    assert "ConvInteger" in ops(out)  # ONNX Runtime's CPU provider runs it (slowly)
    assert result.agreement_int8 is not None and result.agreement_int8 >= 0.9
    if result.speedup is not None and result.speedup <= 1.0:
        assert any("ConvInteger" in note for note in result.notes)


def test_unlabeled_data_gives_agreement_only(float_onnx, val, tmp_path: Path) -> None:
    unlabeled = DataSet(val.x, None, "unlabeled")
    original = load_model("demo").module
    result = quantize_onnx(
        float_onnx, tmp_path / "q.onnx", "static", unlabeled, reference=original,
        measure_latency=False,
    )  # fmt: skip
    assert result.accuracy_float is None and result.accuracy_int8 is None
    assert result.agreement_int8 is not None and result.agreement_int8 >= 0.9
    # fidelity of the pruned float model and of its INT8 version to the unpruned original
    assert result.agreement_float_reference is not None
    assert result.agreement_int8_reference is not None
    assert 0.8 <= result.agreement_float_reference < 1.0
    assert abs(result.agreement_int8_reference - result.agreement_float_reference) <= 0.05


def test_refusals(float_onnx, val, tmp_path: Path) -> None:
    before = float_onnx.read_bytes()
    with pytest.raises(StudioError, match="refusing to write over pruned.onnx"):
        quantize_onnx(float_onnx, float_onnx, "dynamic", val)
    assert float_onnx.read_bytes() == before
    with pytest.raises(StudioError, match="static quantization needs calibration data"):
        quantize_onnx(float_onnx, tmp_path / "q.onnx", "static")
    with pytest.raises(StudioError, match="unknown quantization"):
        quantize_onnx(float_onnx, tmp_path / "q.onnx", "int4", val)
    assert list(tmp_path.iterdir()) == []
