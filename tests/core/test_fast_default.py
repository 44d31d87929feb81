"""Fast by default: the runtime's channel multiple, allocation on its staircase, and the speed
check that names the layers off the fast path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.latency.alignment import (
    channel_multiple,
    optimized_block,
    parse_round_to,
)
from studio.core.latency.layout import nchwc_block
from studio.core.latency.speed_check import SpeedCheck, check_speed, slow_reasons
from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.models.loaded import LoadedModel
from studio.core.plan.allocate import CostModel, allocate, predicted_drop
from studio.core.plan.plan import PruningPlan
from studio.core.plan.search import round_channels
from studio.core.plan.staircase import stairs
from studio.core.scan.sensitivity import scan
from studio.core.scan.types import ScanSettings


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model("demo")


@pytest.fixture(scope="module")
def cost(demo) -> CostModel:
    return CostModel.build(demo, "structured")


@pytest.fixture(scope="module")
def report(demo):
    val = demo_splits()[1].subset(96)
    return scan(demo, val, ScanSettings(metric="loss", ratios=(0.25, 0.5, 0.75)), use_cache=False)


def test_onnx_block_is_read_from_the_optimized_graph_of_this_machine() -> None:
    block = optimized_block()
    # the graph ONNX Runtime builds here pads a 24-channel convolution to whole blocks; the
    # CPU flags say which block MLAS uses (16 with AVX-512, else 8): both must agree
    assert block == nchwc_block()
    found = channel_multiple("onnxruntime")
    assert found.multiple == block and str(block) in found.reason


def test_torch_and_cuda_multiples() -> None:
    wide = "AVX512" in str(torch.backends.cpu.get_cpu_capability()).upper()
    assert channel_multiple("torch").multiple == (16 if wide else 8)
    assert channel_multiple("onnxruntime", "cuda").multiple == 8
    assert channel_multiple("torch", "cuda:0").multiple == 8


def test_round_to_parses_runtime_exact_and_numbers() -> None:
    assert parse_round_to("runtime") == channel_multiple("onnxruntime").multiple
    assert parse_round_to("exact") == 1
    assert parse_round_to("16") == 16 and parse_round_to(4) == 4
    for bad in ("0", "fast", "300"):
        with pytest.raises(StudioError, match="channel multiple"):
            parse_round_to(bad)


def test_stairs_keep_multiples_and_the_cap() -> None:
    assert stairs(64, 1, 16, 0.9).tolist() == [64, 48, 32, 16]
    assert stairs(40, 1, 16, 0.9).tolist() == [40, 32, 16]  # all of them, then multiples
    assert stairs(64, 1, 8, 0.5).tolist() == [64, 56, 48, 40, 32]
    assert stairs(6, 1, 8, 0.5).tolist() == [6, 5, 4, 3]  # too few to follow: single steps


def _kept(cost: CostModel, ratios: dict[str, float]) -> np.ndarray:
    n = cost.steps()
    return n - np.floor(n * cost.ratio_vector(ratios) + 1e-9)


@pytest.mark.parametrize("multiple", [8, 16])
def test_staircase_is_aligned_and_predicts_less_drop_than_rounding_after(
    cost, report, multiple
) -> None:
    stepped = allocate(cost, PruningPlan(round_to=multiple), "sensitivity", "macs", 0.5, report)
    kept = _kept(cost, stepped.ratios)
    n = cost.steps()
    assert all(k == m or k % multiple == 0 for k, m in zip(kept, n) if m >= multiple)
    macs = cost.fractions(stepped.ratios)[1]
    assert macs <= 0.5 + 0.02  # meets the target (a stair may land a little under it)
    # what allocating exactly and rounding afterwards gives, as before
    exact = allocate(cost, PruningPlan(), "sensitivity", "macs", 0.5, report)
    after = round_channels(cost, cost.ratio_vector(exact.ratios), multiple)
    after_ratios = dict(zip(cost.names, after.tolist()))
    staircase_drop = predicted_drop(stepped.ratios, report)[0]
    rounded_drop = predicted_drop(after_ratios, report)[0]
    if cost.fractions(after_ratios)[1] <= macs + 1e-9:  # as much pruned or more
        assert staircase_drop <= rounded_drop + 1e-9
    assert stepped.target["round_to"] == multiple


def test_staircase_reaches_a_latency_like_target_on_every_member(cost, report) -> None:
    # a params target walks the same staircase: every member stays aligned
    plan = allocate(cost, PruningPlan(round_to=8), "sensitivity", "params", 0.4, report)
    assert cost.fractions(plan.ratios)[0] <= 0.42
    kept = _kept(cost, plan.ratios)
    assert all(k == m or k % 8 == 0 for k, m in zip(kept, cost.steps()) if m >= 8)


def _conv_net(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for c_in, c_out in zip([3, *widths], widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10))


def test_slow_reasons_name_layers_that_left_the_block() -> None:
    original = _conv_net([32, 64, 64])
    variant = _conv_net([24, 45, 32])
    off = slow_reasons(original, variant, 8)
    assert off == [("2", 45)]  # 24 and 32 stay on 8-channel blocks; the Linear's 10 never was
    assert slow_reasons(original, variant, 16) == [("0", 24), ("2", 45)]


def test_speed_check_line_names_the_reason_and_the_fix() -> None:
    slow = SpeedCheck("onnxruntime", 1, 2, 1.0, 1.25, 8, [("layers.3.conv1", 23)], 0.5)
    assert not slow.faster and slow.speedup == pytest.approx(0.8)
    line = slow.line()
    assert line.startswith("not faster: 0.80x") and "layers.3.conv1 (23)" in line
    assert "8-channel" in line and "re-plan with runtime channels" in line
    bound = SpeedCheck("onnxruntime", 1, 1, 1.0, 1.1, 8, [], 0.5)
    assert "memory- or overhead-bound" in bound.line() and "re-plan" not in bound.line()
    fast = SpeedCheck("torch", 32, 1, 2.0, 1.0, 8)
    assert fast.line().startswith("2.00x faster") and "PyTorch, batch 32, 1 thread" in fast.line()
    assert fast.to_dict()["speedup"] == 2.0 and fast.to_dict()["reason"] == ""


def test_check_speed_times_both_side_by_side() -> None:
    torch.manual_seed(0)
    small = LoadedModel(_conv_net([8, 8]).eval(), "small", "small", "eager", (1, 3, 16, 16))
    big = LoadedModel(_conv_net([96, 96]).eval(), "big", "big", "eager", (1, 3, 16, 16))
    result = check_speed(small, big, threads=1, seconds=0.3)
    assert result.original_ms > 0 and result.variant_ms > 0
    assert result.speedup == pytest.approx(result.original_ms / result.variant_ms)
    # 100x the MACs: slower whatever the machine does
    assert not result.faster and "not faster" in result.line()
    again = check_speed(big, copy.deepcopy(small), threads=1, seconds=0.3)
    assert again.faster and again.off_path == []


def test_latency_target_is_met_as_measured(demo, cost) -> None:
    from studio.core.latency.target import reach_latency

    plan = reach_latency(demo, cost, PruningPlan(round_to=8), "uniform", 0.6, threads=1)
    target = plan.target
    assert target["kind"] == "latency" and target["candidates"] >= 1
    assert abs(target["measured"] / 0.6 - 1.0) <= 0.10
    kept = _kept(cost, plan.ratios)
    assert all(k == m or k % 8 == 0 for k, m in zip(kept, cost.steps()) if m >= 8)
    with pytest.raises(StudioError, match="fraction"):
        reach_latency(demo, cost, PruningPlan(), "uniform", 1.5)


def test_layer_weights_are_measured_ms_per_mac(demo, cost, report) -> None:
    from studio.core.latency.weights import layer_weights

    weights = layer_weights(demo, cost, threads=1)
    macs = cost.layer_macs()
    assert weights.shape == (len(cost.rows),) and np.all(weights > 0)
    convs = [i for i, name in enumerate(cost.rows) if "conv" in name or "shortcut.0" in name]
    mean = np.sum(weights[convs] * macs[convs]) / np.sum(macs[convs])
    assert mean == pytest.approx(1.0, rel=0.35)  # normalised over the layers the profile names
    assert len(set(np.round(weights[convs], 3))) > 1  # layers differ in time per MAC
    # weighted, the staircase still lands on the MAC target with aligned counts
    plan = allocate(cost, PruningPlan(round_to=8), "sensitivity", "macs", 0.5, report,
                    layer_weights=weights)  # fmt: skip
    assert cost.fractions(plan.ratios)[1] <= 0.52
    kept = _kept(cost, plan.ratios)
    assert all(k == m or k % 8 == 0 for k, m in zip(kept, cost.steps()) if m >= 8)
