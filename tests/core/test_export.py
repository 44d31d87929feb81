"""Verified export: every built-in architecture, pruned, exports to ONNX and TorchScript with the
pruned parameter count; files that would not reproduce the model are refused and nothing is
written; ONNX imports keep their names; input files are never written over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from studio.core.errors import Cancelled, StudioError
from studio.core.export.exporter import export_model, unpruned_architecture
from studio.core.export.verify import module_params
from studio.core.jobs import CancelToken
from studio.core.models import onnx_io as export_onnx
from studio.core.models import zoo
from studio.core.models.load import load_model
from studio.core.models.loaded import LoadedModel
from studio.core.models.loaders import load_file
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pruned(model: LoadedModel, ratio: float = 0.4, method: str = "structured") -> LoadedModel:
    names = prune_targets(model, method)
    return prune(model, PruningPlan(method, ratios={n: ratio for n in names})).model


@pytest.fixture(scope="module")
def pruned_zoo() -> dict[str, tuple[LoadedModel, LoadedModel]]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one_thread
    torch.manual_seed(0)
    models = {}
    for name in zoo.NAMES:
        original = load_model(f"zoo:{name}")
        models[name] = (original, pruned(original))
    torch.set_num_threads(previous)
    return models


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def torch_run(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_pruned_architecture_exports_verified(pruned_zoo, tmp_path: Path, name) -> None:
    original, model = pruned_zoo[name]
    params = module_params(model.module)
    if name != "lstm":  # the LSTM's recurrent group is not pruned structurally
        assert params < 0.8 * module_params(original.module)
    x = np.random.default_rng(1).standard_normal((3, 1, 32, 32)).astype(np.float32)
    expected = torch_run(model, x)
    scale = max(1.0, float(np.abs(expected).max()))

    result = export_model(model, "onnx", tmp_path / "m.onnx", measure_latency=False)
    assert result.params == result.params_model == params
    assert result.max_abs_diff <= 1e-4 * max(1.0, result.output_scale)
    assert result.batch_sizes == (4, 1) and result.dynamic_batch
    assert result.bytes == (tmp_path / "m.onnx").stat().st_size
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    assert np.abs(run_ort(tmp_path / "m.onnx", x) - expected).max() <= 1e-4 * scale

    result = export_model(model, "torchscript", tmp_path / "m.ts", measure_latency=False)
    assert result.params == params and result.max_abs_diff <= 1e-4 * scale
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ts"]  # no temp files


def test_onnx_latency_original_vs_pruned(pruned_zoo, tmp_path: Path) -> None:
    original, model = pruned_zoo["resnet20"]
    progress: list[float] = []
    result = export_model(
        model,
        "onnx",
        tmp_path / "m.onnx",
        original=original,
        latency_budget_s=0.05,
        progress=lambda f, _: progress.append(f),
    )
    assert result.ort_ms_original and result.ort_ms_exported
    assert result.speedup == pytest.approx(result.ort_ms_original / result.ort_ms_exported)
    assert progress[0] == 0.0 and progress[-1] == 1.0
    summary = result.to_dict()
    for key in ("path", "format", "params", "max_abs_diff", "bytes", "ort_ms_original"):
        assert summary[key] is not None
    assert summary["ort_ms_exported"] == result.ort_ms_exported
    # pruned channels (0.4 of 16/32/64) are not multiples of 8, which the export points out
    assert any("multiple of 8" in note for note in result.notes)


def test_unpruned_architecture(pruned_zoo) -> None:
    original, model = pruned_zoo["vgg11"]
    assert unpruned_architecture(original) is original
    fresh = unpruned_architecture(model)
    assert fresh is not None and module_params(fresh.module) == module_params(original.module)


def test_output_that_differs_is_refused_and_nothing_written(
    pruned_zoo, tmp_path: Path, monkeypatch
) -> None:
    _, model = pruned_zoo["resnet20"]
    target = tmp_path / "m.onnx"
    target.write_bytes(b"the previous export")
    real_run = export_onnx.run
    monkeypatch.setattr(export_onnx, "run", lambda s, x: [o + 1e-3 for o in real_run(s, x)])
    with pytest.raises(StudioError, match=r"largest difference 0\.001.*nothing was written"):
        export_model(model, "onnx", target, measure_latency=False)
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_parameter_count_mismatch_is_refused(pruned_zoo, tmp_path: Path, monkeypatch) -> None:
    _, model = pruned_zoo["vgg11"]
    monkeypatch.setattr(export_onnx, "file_params", lambda proto: 7)
    with pytest.raises(StudioError, match="holds 7 parameters but the model has"):
        export_model(model, "onnx", tmp_path / "m.onnx", measure_latency=False)
    assert list(tmp_path.iterdir()) == []


def test_cancel_writes_nothing(pruned_zoo, tmp_path: Path) -> None:
    _, model = pruned_zoo["vgg11"]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        export_model(model, "onnx", tmp_path / "m.onnx", cancel=token)
    assert list(tmp_path.iterdir()) == []


def other_exporter_onnx(path: Path) -> Path:
    """A small CNN written with onnx.helper (as another framework would): input 'images' with
    a symbolic batch, output 'logits'."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
    ]
    inits = [init("w1", 16, 3, 3, 3), init("b1", 16), init("w2", 32, 16, 3, 3), init("b2", 32)]
    inits += [init("w3", 5, 32), init("b3", 5)]
    graph = helper.make_graph(
        nodes,
        "other",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_import_pruned_keeps_names_and_shapes(tmp_path: Path) -> None:
    source = other_exporter_onnx(tmp_path / "other.onnx")
    before = source.read_bytes()
    imported = load_model(str(source))
    model = pruned(imported, 0.5)
    assert module_params(model.module) < module_params(imported.module)
    with pytest.raises(StudioError, match="refusing to write over other.onnx"):
        export_model(model, "onnx", source, measure_latency=False)
    assert source.read_bytes() == before

    result = export_model(model, "onnx", tmp_path / "pruned.onnx", original=imported,
                          latency_budget_s=0.02)  # fmt: skip
    assert (result.input_names, result.output_names) == (("images",), ("logits",))
    assert result.params == module_params(model.module) and result.ort_ms_original
    graph = onnx.load(str(tmp_path / "pruned.onnx")).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == [
        "logits"
    ]
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 8, 8] and isinstance(dims[0], str)
    x = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    out = run_ort(tmp_path / "pruned.onnx", x)
    assert out.shape == (5, 5)
    assert np.abs(out - torch_run(model, x)).max() <= 1e-4


def test_unstructured_zeros_are_exported_and_said(tmp_path: Path) -> None:
    model = pruned(load_model("zoo:vgg11"), 0.5, "unstructured")
    result = export_model(model, "onnx", tmp_path / "m.onnx", measure_latency=False)
    assert result.params == module_params(model.module)  # the zeros are all there
    assert any("stored as zeros" in note for note in result.notes)


def test_fixed_batch(pruned_zoo, tmp_path: Path) -> None:
    _, model = pruned_zoo["vgg11"]
    result = export_model(
        model, "onnx", tmp_path / "m.onnx", dynamic_batch=False, measure_latency=False
    )
    assert not result.dynamic_batch and set(result.batch_sizes) == {1}
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 32, 32]


def test_pytorch_files_reload_without_pickles(pruned_zoo, tmp_path: Path) -> None:
    _, model = pruned_zoo["resnet20"]
    plan = PruningPlan("structured", ratios={"conv1": 0.5})
    result = export_model(model, "pytorch", tmp_path / "m.pt", plan=plan)
    assert result.params == module_params(model.module) and result.max_abs_diff == 0.0
    assert result.extra_files == (tmp_path / "m.module.pt", tmp_path / "m.recipe.yaml")
    assert all(p.exists() for p in result.extra_files)
    reloaded = load_file(tmp_path / "m.pt")  # weights_only: no --trust-pickle needed
    x = model.example_input(2)
    with torch.no_grad():
        assert torch.equal(reloaded.module(x), model.module(x))
    assert PruningPlan.load(tmp_path / "m.recipe.yaml").ratios == {"conv1": 0.5}


def test_pt2(pruned_zoo, tmp_path: Path) -> None:
    _, model = pruned_zoo["vgg11"]
    result = export_model(model, "pt2", tmp_path / "m.pt2")
    assert result.params == module_params(model.module) and result.dynamic_batch
    assert load_file(tmp_path / "m.pt2").kind == "exported"


@pytest.mark.parametrize(
    ("fmt", "name", "kwargs", "needle"),
    [
        ("tflite", "m.tflite", {}, "unknown export format"),
        ("onnx", "m.pt", {}, "written as .onnx"),
        ("pt2", "m.pt", {}, "written as .pt2"),
        ("onnx", "m.onnx", {"opset": 7}, "opset 7 is not supported"),
        ("torchscript", "m.ts", {"opset": 17}, "opset applies to ONNX"),
        ("onnx", "missing/m.onnx", {}, "does not exist"),
    ],
)
def test_bad_requests(pruned_zoo, tmp_path: Path, fmt, name, kwargs, needle) -> None:
    _, model = pruned_zoo["vgg11"]
    with pytest.raises(StudioError, match=needle):
        export_model(model, fmt, tmp_path / name, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_exported_files_reopen_in_the_studio(pruned_zoo, tmp_path: Path) -> None:
    _, model = pruned_zoo["resnet20"]
    x = model.example_input(3)
    with torch.no_grad():
        expected = model.module(x)
    export_model(model, "onnx", tmp_path / "m.onnx", measure_latency=False)
    export_model(model, "torchscript", tmp_path / "m.ts")
    for reopened in (
        load_file(tmp_path / "m.onnx"),
        load_file(tmp_path / "m.ts", input_shape=model.input_shape),
    ):
        assert module_params(reopened.module) == module_params(model.module)
        with torch.no_grad():
            assert torch.allclose(reopened.module(x), expected, atol=1e-4)
