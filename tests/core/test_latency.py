"""Latency: measurement, per-layer profiles, the lookup-table predictor (cache, monotone, no
model build), device profiles and roofline estimates, allocation to a latency target."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken
from studio.core.latency import fit as latency_fit
from studio.core.latency.devices import find_device, list_devices, load_device
from studio.core.latency.devices_estimate import DeviceEstimator, machine_profile
from studio.core.latency.measure import measure_latency, profile_layers
from studio.core.latency.predict import LatencyPredictor, cache_path
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.plan.allocate import TOLERANCE, allocate
from studio.core.plan.plan import PruningPlan


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(Tiny().eval(), "tiny", "tiny", EAGER, (1, 1, 16, 16))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def predictor() -> LatencyPredictor:
    return LatencyPredictor.build(tiny(), "onnxruntime", batch=1, threads=1, fit=False)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_measurement_statistics(runtime):
    seen = []
    result = measure_latency(
        tiny(), runtime, batch=2, threads=1, max_seconds=0.3, progress=lambda f, m: seen.append(f)
    )
    assert result.label == "measured" and result.runtime == runtime
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    # the fastest block's median: at least the fastest run, at most the slowest
    assert result.p10_ms * 0.5 < result.quiet_ms <= result.p90_ms * 2
    assert result.runs >= 10 and result.batch == 2 and result.threads == 1
    assert result.throughput == pytest.approx(2e3 / result.median_ms)
    assert seen[-1] == 1.0
    assert set(result.to_dict()) >= {"median_ms", "p10_ms", "p90_ms", "throughput", "label"}


def test_measurement_cancel():
    token = CancelToken()

    def progress(fraction: float, message: str) -> None:
        if message == "timing":
            token.cancel()

    with pytest.raises(Cancelled):
        measure_latency(tiny(), "torch", threads=1, max_seconds=30, progress=progress, cancel=token)


def test_bad_settings_are_one_line_errors():
    for kwargs in ({"runtime": "tvm"}, {"batch": 0}, {"threads": 0}):
        with pytest.raises(StudioError) as info:
            measure_latency(tiny(), **kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_profile_names_real_layers(runtime):
    model = tiny()
    layers = profile_layers(model, runtime, batch=4, threads=1, runs=10)
    names = {n for n, _ in model.module.named_modules()}
    assert {"conv1", "conv2", "fc"} <= {layer.name for layer in layers}
    assert all(a.ms >= b.ms for a, b in zip(layers, layers[1:]))  # slowest first
    assert sum(layer.share for layer in layers) == pytest.approx(1.0)
    # every time is a real measurement (no timing is compared: times move with the load)
    assert all(math.isfinite(layer.ms) and layer.ms > 0 for layer in layers)
    assert {layer.name for layer in layers if layer.name in names} >= {"conv1", "conv2", "fc"}


def test_predictor_cached_and_reused(predictor):
    assert cache_path("onnxruntime", 1).exists()
    assert predictor.original_ms > 0
    again = LatencyPredictor.build(tiny(), "onnxruntime", batch=1, threads=1, fit=False)
    assert again.calibrated_points == 0  # every micro-benchmark came from the cache
    assert again.nodes == predictor.nodes  # the extra nodes' timings too
    assert again.original_ms == pytest.approx(predictor.original_ms)


def test_predict_monotone_and_without_building(predictor, monkeypatch):
    import studio.core.prune.engine as prune_module

    def refuse(*_args, **_kwargs):
        raise AssertionError("predict() must not prune")

    monkeypatch.setattr(prune_module, "prune", refuse)
    names = predictor.cost.names
    full = predictor.predict({}).total_ms
    # whole NCHWc blocks (ONNX Runtime is not monotone across its layout regimes: 32 -> 30
    # channels leaves the blocked layout and can be slower, and the table says so)
    half = predictor.predict(dict.fromkeys(names, 0.5)).total_ms  # 32 -> 16 channels
    most = predictor.predict(dict.fromkeys(names, 0.75)).total_ms  # 32 -> 8
    assert half <= full * 1.15 and most <= half * 1.15
    result = predictor.predict(PruningPlan("structured", ratios=dict.fromkeys(names, 0.5)))
    assert result.label == "estimated" and result.layers[0].label == "estimated"
    assert result.total_ms == pytest.approx(sum(x.ms for x in result.layers) + result.overhead_ms)
    assert {layer.name for layer in result.layers} == {"conv1", "conv2", "fc"}
    dense = predictor.predict(PruningPlan("unstructured", ratios={"conv2": 0.8}))
    assert dense.total_ms == pytest.approx(full) and dense.note


def test_fit_is_cached(monkeypatch):
    monkeypatch.setattr(latency_fit, "FIT_RANDOM", 1)
    monkeypatch.setattr(latency_fit, "FIT_PASSES", 1)
    monkeypatch.setattr(latency_fit, "FIT_SECONDS", 0.0)
    monkeypatch.setattr(latency_fit, "FIT_ROUNDED", 1)
    first = LatencyPredictor.build(tiny(), "onnxruntime", batch=2, threads=1)
    assert (first.coef[:-1] >= 0).all() and first.measured_ms > 0  # the constant may be < 0
    again = LatencyPredictor.build(tiny(), "onnxruntime", batch=2, threads=1)
    assert again.calibrated_points == 0 and list(again.coef) == list(first.coef)


def test_fit_one_scale_per_regime():
    rng = np.random.default_rng(3)
    # columns: two regimes' table times, one regime no variant reached, extra nodes, constant
    features = np.column_stack(
        [rng.uniform(1, 5, 20), rng.uniform(0, 3, 20), np.zeros(20), rng.uniform(0, 1, 20)]
        + [np.ones(20)]
    )
    truth = np.array([0.8, 1.6, 0.0, 0.5, -0.2])
    coef = latency_fit.least_squares(features, features @ truth)
    # close to the truth (each regime's scale is pulled a little towards the shared one)
    assert coef[[0, 1, 3, 4]] == pytest.approx(truth[[0, 1, 3, 4]], abs=0.05)
    # the unreached regime gets the scale of all layers' table time together
    assert 0.8 < coef[2] < 1.6
    # scales stay >= 0 when the data would pull one below; the constant may go negative
    skewed = latency_fit.least_squares(features, features @ np.array([1, -0.5, 0, 0.5, 3.0]))
    assert (skewed[:-1] >= 0).all()
    # a regime whose time moves with another's does not take a wild scale
    twin = features.copy()
    twin[:, 1] = 0.01 * twin[:, 0]
    assert latency_fit.least_squares(twin, twin @ truth)[1] < 3


def test_passes_interleave_and_quiet_keeps_the_fastest_pass():
    calls: list[str] = []
    slow_pass = {"n": 0}

    def runner(name: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            calls.append(name)
            time.sleep(0.01 if slow_pass["n"] == 1 else 0.001)

        return run

    def progress(fraction: float, _text: str) -> None:
        slow_pass["n"] += 1

    passes = latency_fit.time_passes([runner("a"), runner("b")], 3, progress)
    assert passes.shape == (3, 2)
    timed = [c for c in calls[4:]]  # after two warm-up runs each
    assert timed[0] == "a" and "b" in timed[: len(timed) // 3 + 1]  # a's block, then b's
    assert passes[1].min() > 2 * passes[0].max()  # the slowed pass
    assert latency_fit.quiet(passes) == pytest.approx(passes[[0, 2]].min(axis=0))


def test_quiet_side_by_side_replaces_only_the_quiet_figure():
    models = [tiny(), tiny()]
    measured = [measure_latency(m, "onnxruntime", 1, 1, max_seconds=0.2) for m in models]
    again = latency_fit.quiet_side_by_side(models, measured, 0.2)
    for before, after in zip(measured, again):
        assert after.quiet_ms > 0 and after.quiet_ms != before.quiet_ms
        assert (after.median_ms, after.runs, after.p90_ms) == (
            before.median_ms,
            before.runs,
            before.p90_ms,
        )


def test_latency_target_allocation(predictor):
    plan = allocate(
        predictor.cost,
        PruningPlan("structured"),
        "uniform",
        "latency",
        0.7,
        predictor=predictor,
    )
    assert predictor.fraction(plan) <= 0.7 + TOLERANCE
    assert plan.target["kind"] == "latency" and plan.target["predicted_ms"] > 0
    with pytest.raises(StudioError, match="predictor"):
        allocate(predictor.cost, PruningPlan("structured"), "uniform", "latency", 0.7)


def test_bundled_device_profiles_load():
    profiles = {p.name: p for p in list_devices()}
    assert {"rpi4-cortex-a72", "jetson-orin-nano", "a100", "coral-edge-tpu"} <= set(profiles)
    assert {p.sparsity for p in profiles.values()} >= {"dense", "2:4", "unstructured"}
    assert all(p.source for p in profiles.values())
    assert find_device("a100").peak("fp16") > find_device("a100").peak("fp32")


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\n", "missing"),
        (
            "name: x\nsource: s\npeak_ops: {fp32: 1e9}\nmemory_bandwidth: 1e9\nsparsity: 3:8\n",
            "sparsity",
        ),
        ("name: x\nsource: s\npeak_ops: {fp64: 1e9}\nmemory_bandwidth: 1e9\n", "unknown key"),
        ("name: x\nsource: s\npeak_ops: {fp32: 1e9}\nmemory_bandwidth: -1\n", "positive"),
        ("name: [x\n", "not valid YAML"),
    ],
)
def test_bad_device_profile_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(StudioError, match=message) as info:
        load_device(path)
    assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)


def test_user_profile_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_DEVICES_DIR", str(tmp_path))
    (tmp_path / "mine.yaml").write_text(
        "name: mine\nsource: my bench\npeak_ops: {fp32: 1e10}\nmemory_bandwidth: 1e10\n"
    )
    assert find_device("mine").peak("fp32") == 1e10


def test_roofline_estimates_and_sparsity():
    estimator = DeviceEstimator.build(tiny(), batch=1)
    dense, sparse = find_device("rpi4-cortex-a72"), find_device("sparse-accelerator")
    base = estimator.estimate(dense)
    assert base.label == "estimated" and base.total_ms > 0 and base.energy_mj > 0
    assert {layer.bound for layer in base.layers} <= {"compute", "memory"}
    assert all(layer.label == "estimated" for layer in base.layers)
    zeros = PruningPlan("unstructured", ratios={"conv2": 0.8, "fc": 0.8})
    assert estimator.estimate(dense, zeros).total_ms == pytest.approx(base.total_ms)
    skipped = estimator.estimate(sparse, zeros)
    assert skipped.sparsity_used == "unstructured"
    assert skipped.macs < estimator.estimate(sparse).macs
    half = PruningPlan("structured", ratios={"conv1": 0.5})
    assert estimator.estimate(dense, half).macs < base.macs
    with pytest.raises(StudioError, match="int8"):
        estimator.estimate(find_device("coral-edge-tpu"), dtype="fp32")


def test_machine_profile(predictor):
    profile = machine_profile(predictor, bandwidth=1e10)
    assert profile.peak("fp32") > 0 and profile.name == "this-machine"
    assert 0 < profile.efficiency_of("conv") <= 1


def test_torch_predictor(monkeypatch):
    monkeypatch.setattr(latency_fit, "FIT_RANDOM", 1)
    monkeypatch.setattr(latency_fit, "FIT_PASSES", 1)
    monkeypatch.setattr(latency_fit, "FIT_SECONDS", 0.0)
    monkeypatch.setattr(latency_fit, "FIT_ROUNDED", 1)
    predictor = LatencyPredictor.build(tiny(), "torch", batch=1, threads=1)
    names = predictor.cost.names
    result = predictor.predict(dict.fromkeys(names, 0.5))
    assert result.runtime == "torch" and result.total_ms > 0
    assert cache_path("torch", 1).exists()


def test_anchor_to_a_fresh_measurement(predictor):
    names = predictor.cost.names
    before = predictor.fraction(dict.fromkeys(names, 0.5))
    original = predictor.original_ms
    try:
        predictor.anchor_to(2 * original)
        assert predictor.predict({}).total_ms == pytest.approx(2 * original)
        assert predictor.fraction(dict.fromkeys(names, 0.5)) == pytest.approx(before)
    finally:
        predictor.anchor_to(original)
