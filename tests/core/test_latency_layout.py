"""The NCHWc layout rule and the extra nodes it implies, checked against the graphs ONNX
Runtime really builds (its optimized model), for channel counts aligned and not."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
from torch import nn

from studio.core.latency.layout import EXTRA_KINDS, LayoutGraph, conv_runs_nchwc, nchwc_block
from studio.core.models import onnx_io as export_onnx

ort = pytest.importorskip("onnxruntime")
NCHWC = "com.microsoft.nchwc"


class Residual(nn.Module):
    """Stem, a residual block with a 1x1 shortcut, an identity block, pooling, a classifier."""

    def __init__(self, a: int, b: int, c: int, d: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, a, 3, padding=1)
        self.bn = nn.BatchNorm2d(a)
        self.conv1 = nn.Conv2d(a, b, 3, padding=1)
        self.conv2 = nn.Conv2d(b, c, 3, padding=1)
        self.shortcut = nn.Conv2d(a, c, 1)
        self.conv3 = nn.Conv2d(c, d, 3, padding=1)
        self.conv4 = nn.Conv2d(d, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))
        y = torch.relu(self.conv4(torch.relu(self.conv3(y))) + y)
        y = torch.relu(self.dw(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def exported(module: nn.Module) -> bytes:
    return export_onnx.onnx_bytes(module.eval(), torch.zeros(1, 3, 8, 8))


def ort_graph(data: bytes, tmp_path) -> onnx.GraphProto:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx")).graph


def ort_counts(graph: onnx.GraphProto) -> dict[str, int]:
    ops = collections.Counter((n.domain == NCHWC, n.op_type) for n in graph.node)
    return {
        "ReorderInput": ops[(True, "ReorderInput")],
        "ReorderOutput": ops[(True, "ReorderOutput")],
        "Add": ops[(False, "Add")] + ops[(True, "Add")],
        "Relu": sum(ops[(False, op)] + ops[(True, op)] for op in ("Relu", "Clip")),
        "nchwc": ops[(True, "Conv")],
    }


@pytest.mark.parametrize(
    "c_in, c_out, groups",
    [(3, 10, 1), (8, 10, 1), (12, 16, 1), (13, 16, 1), (16, 7, 1), (20, 9, 1), (10, 10, 10)]
    + [(12, 12, 12), (16, 16, 16), (6, 6, 6)],
)
def test_conv_layout_rule_matches_onnx_runtime(tmp_path, c_in, c_out, groups):
    conv = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups), nn.ReLU())
    data = export_onnx.onnx_bytes(conv.eval(), torch.zeros(1, c_in, 8, 8))
    graph = ort_graph(data, tmp_path)
    built = any(n.domain == NCHWC and n.op_type == "Conv" for n in graph.node)
    assert conv_runs_nchwc(c_in, c_out, groups, nchwc_block()) == built


@pytest.mark.parametrize(
    "widths",
    [(16, 16, 16, 16), (16, 13, 16, 16), (13, 16, 13, 16), (12, 10, 20, 11), (11, 11, 11, 11)]
    + [(16, 16, 12, 9), (6, 16, 16, 13), (10, 5, 24, 24)],
)
def test_simulated_layout_matches_onnx_runtime(tmp_path, widths):
    reference = LayoutGraph.from_onnx(exported(Residual(16, 16, 16, 16)))
    variant = Residual(*widths)
    channels = {
        name: (mod.in_channels, mod.out_channels)
        for name, mod in variant.named_modules()
        if isinstance(mod, nn.Conv2d)
    }
    layout = reference.simulate(channels, nchwc_block())
    simulated = {**layout.counts(), "nchwc": sum(layout.nchwc.values())}
    assert simulated == ort_counts(ort_graph(exported(variant), tmp_path))
    assert set(layout.nchwc) == set(channels) and set(layout.counts()) == set(EXTRA_KINDS)


def test_aligned_model_needs_no_reorders_between_layers():
    layout = LayoutGraph.from_onnx(exported(Residual(16, 16, 16, 16))).simulate(
        {"stem": (3, 16), "conv1": (16, 16), "conv2": (16, 16), "shortcut": (16, 16)}
        | {"conv3": (16, 16), "conv4": (16, 16), "dw": (16, 16)},
        8,
    )
    assert all(layout.nchwc.values())
    assert layout.counts() == {"ReorderInput": 0, "ReorderOutput": 1, "Add": 0, "Relu": 0}
