"""ONNX import: graph normalisation, dynamic shapes, conversion errors, ONNX Runtime check."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from studio.core.errors import StudioError
from studio.core.models import onnx_converters, onnx_import, zoo
from studio.core.models.loaded import ONNX
from studio.core.models.loaders import load_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)


def save(
    tmp_path: Path,
    nodes: list[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto] = (),
    dims: Sequence[int | str] = (1, 3, 8, 8),
    inputs: Sequence[str] = ("x",),
    name: str = "model.onnx",
) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, list(dims)) for i in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def conv_relu(weight_inputs: tuple[str, str] = ("W", "B")) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", ["x", *weight_inputs], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]


def reference(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(
        torch.nn.functional.conv2d(x, torch.from_numpy(WEIGHT), torch.from_numpy(BIAS), padding=1)
    )


def test_weights_in_constant_nodes(tmp_path: Path) -> None:
    """Paddle2ONNX writes every weight as a Constant node, which onnx2torch cannot convert."""
    constants = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(WEIGHT)),
        helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(BIAS)),
    ]
    path = save(tmp_path, constants + conv_relu())
    with pytest.raises(KeyError):
        onnx_converters.onnx2torch_convert()(onnx.load(str(path)))  # the plain conversion fails
    loaded = load_file(path)
    assert loaded.kind == ONNX and loaded.input_shape == (1, 3, 8, 8)
    assert loaded.input_names == ("x",) and loaded.output_names == ("y",)
    assert loaded.onnx_max_diff is not None and loaded.onnx_max_diff < 1e-5
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), reference(x))
    assert any("Constant" in note for note in loaded.notes)


def test_onnxslim_simplifies_when_plain_conversion_fails(tmp_path: Path) -> None:
    half = numpy_helper.from_array(WEIGHT / 2, "half")
    nodes = [helper.make_node("Add", ["half", "half"], ["W"]), *conv_relu()]
    path = save(tmp_path, nodes, [half, numpy_helper.from_array(BIAS, "B")])
    loaded = load_file(path)
    assert any("onnxslim" in note for note in loaded.notes)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), reference(x))


def weights() -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "B")]


def test_dynamic_dimensions_need_an_input_shape(tmp_path: Path) -> None:
    path = save(tmp_path, conv_relu(), weights(), dims=("N", 3, "H", "W"))
    with pytest.raises(StudioError) as info:
        load_file(path)
    assert str(info.value) == (
        "model.onnx: input 'x' has dynamic dimensions [N, 3, H, W]; pass --input-shape 1,3,H,W"
    )
    loaded = load_file(path, input_shape=(1, 3, 16, 16))
    assert loaded.input_shape == (1, 3, 16, 16)
    assert any("batch 1 and 2" in note for note in loaded.notes)
    with pytest.raises(StudioError, match="contradicts"):
        load_file(path, input_shape=(1, 4, 16, 16))


def test_dynamic_batch_alone_defaults_to_one(tmp_path: Path) -> None:
    loaded = load_file(save(tmp_path, conv_relu(), weights(), dims=("batch", 3, 8, 8)))
    assert loaded.input_shape == (1, 3, 8, 8)
    with pytest.raises(StudioError, match=r"has shape \[batch, 3, 8, 8\]"):
        load_file(loaded.path, input_shape=(1, 3, 9, 9))


def test_models_the_studio_cannot_take(tmp_path: Path) -> None:
    two_inputs = save(tmp_path, [helper.make_node("Add", ["a", "b"], ["y"])], inputs=("a", "b"))
    with pytest.raises(StudioError, match=r"has 2 inputs \('a', 'b'\)"):
        load_file(two_inputs)
    hardmax = save(tmp_path, [helper.make_node("Hardmax", ["x"], ["y"])], name="hardmax.onnx")
    with pytest.raises(StudioError) as info:
        load_file(hardmax)
    assert "operation Hardmax (opset 17) is not supported by the ONNX converter" in str(info.value)
    broken = save(tmp_path, [helper.make_node("Relu", ["nowhere"], ["y"])], name="broken.onnx")
    with pytest.raises(StudioError, match="broken.onnx is not a valid ONNX model"):
        load_file(broken)


def test_a_conversion_that_differs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(tmp_path, conv_relu(), weights())
    real_convert = onnx_import._convert

    def one_percent_off(*args: object) -> torch.nn.Module:
        module = real_convert(*args)
        return lambda x: module(x) * 1.01  # type: ignore[return-value]

    monkeypatch.setattr(onnx_import, "_convert", one_percent_off)
    with pytest.raises(StudioError, match="does not match ONNX Runtime"):
        load_file(path)


def test_torchvision_placeholder_only_inside_onnx2torch() -> None:
    onnx_converters.onnx2torch_convert()
    from onnx2torch.node_converters import nms

    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or does not load beside this torch
        assert "torchvision" not in sys.modules
        with pytest.raises(StudioError, match="need torchvision"):
            nms.torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_models_round_trip_through_onnx(tmp_path: Path, name: str) -> None:
    model = zoo.build(name).eval()
    shape = zoo.default_input_shape(name)
    path = tmp_path / f"{name}.onnx"
    # torch 2.13's default (dynamo) exporter needs onnxscript; the TorchScript one does not
    torch.onnx.export(
        model,
        (torch.randn(*shape),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    loaded = load_file(path)
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(x), loaded.module(x)
    scale = max(1.0, expected.abs().max().item())  # random deep nets reach outputs in the 1000s
    assert loaded.onnx_max_diff is not None and loaded.onnx_max_diff / scale <= 1e-4
    assert (expected - got).abs().max().item() / scale <= 1e-4
    assert loaded.input_shape == shape
    assert (loaded.input_names, loaded.output_names) == (("image",), ("logits",))


class _Recurrent(torch.nn.Module):
    """Ops onnx2torch 1.5.15 lacks at the opset torch exports: LSTM, ReduceMean/Max-18, Split-18."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        head, tail = x.split([3, 5], dim=2)
        return self.fc(out[:, -1]) + h.mean() + c.amax(dim=(0, 2)).unsqueeze(1) + tail.mean()


def test_added_converters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Recurrent().eval()
    path = tmp_path / "recurrent.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 5, 8),),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    loaded = load_file(path)
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), atol=1e-5, rtol=1e-5)
