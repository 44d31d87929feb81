"""ONNX in, ONNX out (issue 19, part 4): a model imported from ONNX remembers the opset and the
dynamic dims its file declared, and a pruned copy saved as .onnx (or exported) declares the same
names, dims and opset, runs in ONNX Runtime as the pruned module runs in torch, and is written
only when it does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.export.exporter import export_model
from studio.core.models import onnx_io
from studio.core.models.load import load_model
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.models.pruned_file import save_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import PruneResult, prune, prune_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

AXES = {"images": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}}
SHAPE = (1, 3, 32, 32)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """conv-bn-relu x3 with a residual add around the third, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16, 2)
        self.body = conv_bn_relu(16, 32)
        self.branch = conv_bn_relu(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        x = x + self.branch(x)
        return self.head(x.mean((2, 3)))


def write_onnx(module: nn.Module, path: Path, axes: dict, opset: int = 18) -> Path:
    torch.onnx.export(
        module.eval(), (torch.randn(*SHAPE),), str(path), dynamo=False, opset_version=opset,
        input_names=["images"], output_names=["logits"], dynamic_axes=axes,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = SmallCNN()
    for mod in net.modules():  # statistics a trained network would have
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
    return write_onnx(net, tmp_path_factory.mktemp("onnx") / "cnn.onnx", AXES)


@pytest.fixture(scope="module")
def imported(source: Path) -> LoadedModel:
    return load_model(str(source), input_shape=SHAPE)


@pytest.fixture(scope="module")
def pruned(imported: LoadedModel) -> PruneResult:
    names = prune_targets(imported, "structured")
    return prune(imported, PruningPlan("structured", ratios={n: 0.4 for n in names}))


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def torch_run(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_the_import_remembers_what_the_file_declared(imported, pruned) -> None:
    assert imported.onnx_opset == 18
    assert imported.onnx_dynamic_axes == AXES
    assert (imported.input_names, imported.output_names) == (("images",), ("logits",))
    # the pruned copy carries them over, as it does the names
    assert pruned.model.onnx_opset == 18 and pruned.model.onnx_dynamic_axes == AXES
    assert pruned.model.input_names == ("images",) and pruned.params_after < pruned.params_before
    zoo = load_model("zoo:vgg11")
    assert zoo.onnx_opset is None and zoo.onnx_dynamic_axes is None


def test_a_dim_without_a_name_is_dynamic_too(tmp_path: Path) -> None:
    path = write_onnx(SmallCNN(), tmp_path / "m.onnx", {"images": {0: "n"}})
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()  # neither size nor name
    onnx.save(model, str(path))
    axes = load_model(str(path)).onnx_dynamic_axes
    assert axes is not None and axes["images"] == {0: "images_dim0"}


def test_pruned_onnx_keeps_names_dims_and_opset(source, imported, pruned, tmp_path) -> None:
    before = source.read_bytes()
    notes: list[str] = []
    out = save_model(pruned.model, tmp_path / "pruned.onnx", (source,), notes)
    assert out == tmp_path / "pruned.onnx" and notes == []
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx"]  # no temporary files
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert dims(model.graph.input[0]) == ["batch", 3, "h", "w"]
    assert dims(model.graph.output[0]) == ["batch", 5]
    assert ai_onnx_opset(model) == 18
    assert out.stat().st_size < source.stat().st_size
    rng = np.random.default_rng(3)
    for shape in ((1, 3, 32, 32), (3, 3, 32, 32), (2, 3, 48, 40)):
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = run_ort(out, x), torch_run(pruned.module, x)
        assert got.shape == (shape[0], 5)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # and it loads back into the studio as an ONNX model of its own
    again = load_model(str(out), input_shape=SHAPE)
    assert again.onnx_dynamic_axes == AXES and again.onnx_opset == 18


def test_a_failed_check_writes_nothing(pruned, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "pruned.onnx"
    target.write_bytes(b"an earlier file")
    real_run = onnx_io.run
    monkeypatch.setattr(onnx_io, "run", lambda s, x: [o + 1e-2 for o in real_run(s, x)])
    with pytest.raises(StudioError, match=r"largest difference 0\.01.*nothing was written"):
        save_model(pruned.model, target)
    assert target.read_bytes() == b"an earlier file"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.onnx"]


class FlatHead(nn.Module):
    """A head that only runs at the size it was built for (flatten, then linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn_relu(3, 8, 4)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_a_declared_dynamic_dim_that_is_not_writes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = write_onnx(FlatHead(), tmp_path / "flat.onnx", AXES)
    model = load_model(str(source), input_shape=SHAPE)
    assert model.onnx_dynamic_axes == AXES  # what the file says, though only 32x32 runs
    with pytest.raises(StudioError, match=r"\(1, 3, 64, 64\).*nothing was written") as error:
        save_model(model, tmp_path / "out.onnx")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.onnx"]


def test_an_opset_torch_cannot_write_is_replaced_and_said(pruned, tmp_path: Path) -> None:
    newer = dataclasses.replace(pruned.model, onnx_opset=onnx_io.MAX_OPSET + 1)
    notes: list[str] = []
    out = save_model(newer, tmp_path / "p.onnx", notes=notes)
    assert ai_onnx_opset(onnx.load(str(out))) == onnx_io.MAX_OPSET
    assert len(notes) == 1 and f"opset {onnx_io.MAX_OPSET + 1}" in notes[0]
    assert f"written with opset {onnx_io.MAX_OPSET}" in notes[0]


def test_a_model_not_from_onnx_is_saved_with_plain_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    model = LoadedModel(module.eval(), "tiny", "tiny", EAGER, (1, 3, 8, 8))
    out = save_model(model, tmp_path / "tiny.onnx")
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == [
        "output"
    ]
    assert dims(graph.input[0]) == ["batch", 3, 8, 8]
    assert ai_onnx_opset(onnx.load(str(out))) == onnx_io.DEFAULT_OPSET
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(None, {"input": x})[0] - torch_run(module, x)).max() <= 1e-4


def test_export_keeps_what_the_file_declared(pruned, tmp_path: Path) -> None:
    result = export_model(pruned.model, "onnx", tmp_path / "e.onnx", measure_latency=False)
    model = onnx.load(str(result.path))
    assert result.opset == 18 and ai_onnx_opset(model) == 18
    assert dims(model.graph.input[0]) == ["batch", 3, "h", "w"]
    assert dims(model.graph.output[0]) == ["batch", 5]
    assert result.dynamic_batch and result.batch_sizes == (4, 1)
    assert any("checked at input shape 1,3,64,64" in n for n in result.notes)
    assert any("names and dynamic dims are kept" in n for n in result.notes)
    # asked for, a fixed shape and another opset
    fixed = export_model(
        pruned.model, "onnx", tmp_path / "f.onnx", opset=13, dynamic_batch=False,
        measure_latency=False,
    )  # fmt: skip
    model = onnx.load(str(fixed.path))
    assert ai_onnx_opset(model) == 13 and dims(model.graph.input[0]) == [1, 3, 32, 32]
