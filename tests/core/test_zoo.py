"""Built-in architectures: construction, shapes, export/tracing, and the bundled demo weights."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from studio.core.errors import StudioError
from studio.core.models import zoo
from studio.core.models.data import demo_splits
from studio.core.paths import DEMO_WEIGHTS

CNNS = ("resnet20", "resnet56", "vgg11", "mobilenetv2")


def _build(
    name: str, shape: tuple[int, ...] | None = None, num_classes: int = 10
) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = shape or zoo.default_input_shape(name)
    return zoo.build(name, input_shape=shape, num_classes=num_classes).eval()


@pytest.mark.parametrize("name", zoo.NAMES)
def test_builds_and_forward_shape(name: str) -> None:
    assert zoo.default_input_shape(name) == (1, 1, 32, 32)
    model = _build(name, num_classes=7)
    assert sum(p.numel() for p in model.parameters()) > 0
    with torch.no_grad():
        out = model(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", (*CNNS, "vit", "lstm"))
def test_three_channel_input(name: str) -> None:
    model = _build(name, (1, 3, 32, 32))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", (*CNNS, "vit", "lstm"))
def test_non_square_input(name: str) -> None:
    model = _build(name, (1, 3, 48, 64))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 64)).shape == (2, 10)


def test_vit_needs_size_divisible_by_patch() -> None:
    with pytest.raises(StudioError, match="divisible"):
        zoo.build("vit", input_shape=(1, 1, 30, 32))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(StudioError) as info:
        zoo.build("resnet18")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in zoo.NAMES)
    with pytest.raises(StudioError):
        zoo.default_input_shape("nope")


@pytest.mark.parametrize("shape", [(1, 32, 32), (1, 1, 0, 32), (1, 1, 32, 32, 1)])
def test_bad_input_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(StudioError, match="input shape"):
        zoo.build("resnet20", input_shape=shape)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_torchscript_trace_and_onnx_export(name: str) -> None:
    import onnxruntime as ort

    model = _build(name)
    x = torch.randn(zoo.default_input_shape(name))
    batch = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        expected = model(x)
        # check_trace re-traces and compares graphs (seconds); comparing outputs is enough
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(traced(batch), model(batch))  # batch size is not baked in
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the default dynamo exporter needs onnxscript, which the studio does not install
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["input"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    scale = float(expected.abs().max()) + 1.0
    assert np.abs(got - expected.numpy()).max() <= 1e-4 * scale


@pytest.mark.parametrize("name", zoo.NAMES)
def test_torch_pruning_builds_dependency_graph(name: str) -> None:
    import torch_pruning as tp

    model = _build(name)
    x = torch.randn(zoo.default_input_shape(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ViT: "unwrapped parameters" (cls_token, pos_embed)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    assert list(graph.get_all_groups())


def test_demo_weights_reach_97_percent() -> None:
    model = zoo.build("resnet20", zoo.default_input_shape("resnet20"), num_classes=10)
    model.load_state_dict(torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    val = demo_splits()[1]
    assert val.y is not None
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(1) for x in val.x.split(256)])
    accuracy = (predictions == val.y).float().mean().item()
    assert accuracy >= 0.97, f"demo accuracy {accuracy:.4f}"
