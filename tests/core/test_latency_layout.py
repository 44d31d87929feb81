"""The NCHWc layout rule and the extra nodes it implies, checked against the graphs ONNX
Runtime really builds on this machine (its optimized model), for channel counts aligned and not.
The block is this machine's (8 channels with AVX2, 16 with AVX-512): the cases are written
around it, so that each one tests the same side of the rule on either kind of CPU."""

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
B = nchwc_block()  # this machine's; the optimized graph below shows the same


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


def unique(cases: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return list(dict.fromkeys(cases))


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


def conv_graph(c_in: int, c_out: int, groups: int, tmp_path) -> onnx.GraphProto:
    conv = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups), nn.ReLU())
    data = export_onnx.onnx_bytes(conv.eval(), torch.zeros(1, c_in, 8, 8))
    return ort_graph(data, tmp_path)


def test_block_is_the_one_onnx_runtime_pads_to(tmp_path):
    graph = conv_graph(3, 5, 1, tmp_path)
    (conv,) = [n for n in graph.node if n.domain == NCHWC and n.op_type == "Conv"]
    weights = {t.name: t for t in graph.initializer}
    assert weights[conv.input[1]].dims[0] == B  # 5 output channels padded to one block


@pytest.mark.parametrize(
    "c_in, c_out, groups",
    # plain convolutions: fewer input channels than a block (read NCHW directly), a multiple
    # of the block, a multiple of 4 that is not one, neither (duplicates dropped where B is 8)
    unique(
        [(3, 10, 1), (B - 3, B + 2, 1), (8, 10, 1), (B, 10, 1), (2 * B, 7, 1), (B + 4, 9, 1)]
        + [(12, 16, 1), (13, 16, 1), (16, 7, 1), (20, 9, 1), (B + 5, B, 1), (2 * B + 2, B, 1)]
        # depthwise: a multiple of 4 channels or not, below, at and above a block
        + [(10, 10, 10), (12, 12, 12), (16, 16, 16), (6, 6, 6), (B, B, B), (B + 4, B + 4, B + 4)]
        + [(B + 6, B + 6, B + 6), (2 * B, 2 * B, 2 * B)]
    ),
)
def test_conv_layout_rule_matches_onnx_runtime(tmp_path, c_in, c_out, groups):
    graph = conv_graph(c_in, c_out, groups, tmp_path)
    built = any(n.domain == NCHWC and n.op_type == "Conv" for n in graph.node)
    assert conv_runs_nchwc(c_in, c_out, groups, B) == built


@pytest.mark.parametrize(
    "widths",
    unique(
        [(16, 16, 16, 16), (16, 13, 16, 16), (13, 16, 13, 16), (12, 10, 20, 11), (11, 11, 11, 11)]
        + [(16, 16, 12, 9), (6, 16, 16, 13), (10, 5, 24, 24)]
        # around this machine's block: aligned, a multiple of 4 off it, off by one, below it
        + [(B, B, B, B), (2 * B, B + 4, 2 * B, B), (B, B + 1, B, B - 1), (B - 2, 2 * B, B + 3, B)]
    ),
)
def test_simulated_layout_matches_onnx_runtime(tmp_path, widths):
    reference = LayoutGraph.from_onnx(exported(Residual(16, 16, 16, 16)))
    variant = Residual(*widths)
    channels = {
        name: (mod.in_channels, mod.out_channels)
        for name, mod in variant.named_modules()
        if isinstance(mod, nn.Conv2d)
    }
    layout = reference.simulate(channels, B)
    simulated = {**layout.counts(), "nchwc": sum(layout.nchwc.values())}
    assert simulated == ort_counts(ort_graph(exported(variant), tmp_path))
    assert set(layout.nchwc) == set(channels) and set(layout.counts()) == set(EXTRA_KINDS)


def test_aligned_model_needs_no_reorders_between_layers(tmp_path):
    aligned = Residual(2 * B, B, 2 * B, B)
    channels = {
        name: (mod.in_channels, mod.out_channels)
        for name, mod in aligned.named_modules()
        if isinstance(mod, nn.Conv2d)
    }
    layout = LayoutGraph.from_onnx(exported(Residual(16, 16, 16, 16))).simulate(channels, B)
    assert all(layout.nchwc.values())
    expected = {"ReorderInput": 0, "ReorderOutput": 1, "Add": 0, "Relu": 0}
    assert layout.counts() == expected
    assert ort_counts(ort_graph(exported(aligned), tmp_path)) == {**expected, "nchwc": 7}
