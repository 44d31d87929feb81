"""Cost model, allocation and predicted drop: checked against real pruning with Torch-Pruning."""

from __future__ import annotations

import copy
import json
import random
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.models import graph
from studio.core.models.data import demo_splits
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.core.models.loaded import LoadedModel
from studio.core.plan.allocate import CostModel, allocate, load_scan, predicted_drop
from studio.core.plan.plan import PruningPlan
from studio.core.scan.masks import channels_to_prune, weight_mask
from studio.core.scan.sensitivity import scan
from studio.core.scan.types import ScanSettings


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model("demo")


@pytest.fixture(scope="module")
def cost(demo) -> CostModel:
    return CostModel.build(demo, "structured")


@pytest.fixture(scope="module")
def val64():
    return demo_splits()[1].subset(64)


@pytest.fixture(scope="module")
def report(demo, val64):
    """A real exact scan, small: 64 validation images, three ratios, loss metric."""
    return scan(demo, val64, ScanSettings(metric="loss", ratios=(0.3, 0.6, 0.9)), use_cache=False)


def measured(model: LoadedModel, module: nn.Module) -> tuple[int, int]:
    inv = build_inventory(LoadedModel(module, "pruned", "pruned", "eager", model.input_shape))
    return inv.params, inv.macs


def prune_for_real(model: LoadedModel, ratios: dict[str, float], seed: int = 0) -> nn.Module:
    """A copy of the model with each group's floor-rule channel count removed by Torch-Pruning
    (random channels: which ones does not change the counts)."""
    import torch_pruning as tp

    rng = random.Random(seed)
    pruned = copy.deepcopy(model.module)
    x = model.example_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=x, verbose=False)
    mods = dict(pruned.named_modules())
    for name, ratio in ratios.items():
        root = mods[name]
        pruner = dg.get_pruner_of_module(root)
        channels = pruner.get_out_channels(root)
        heads = graph.fused_qkv_heads(pruned, name)
        if heads:
            per_head = channels_to_prune(channels // 3 // heads, ratio)
            idxs = graph.qkv_channels([rng.random() for _ in range(channels)], heads, per_head)
        else:
            idxs = sorted(rng.sample(range(channels), channels_to_prune(channels, ratio)))
        if idxs:
            dg.get_pruning_group(root, pruner.prune_out_channels, idxs).prune()
    with torch.no_grad():
        pruned(x)  # still runs
    return pruned


@pytest.mark.parametrize(
    "spec, vectors", [("demo", 2), ("zoo:mobilenetv2", 1), ("zoo:vgg11", 1), ("zoo:vit", 1)]
)
def test_structured_predict_equals_real_pruning(demo, spec, vectors) -> None:
    model = demo if spec == "demo" else load_model(spec)
    fingerprint = model.fingerprint()
    model_cost = CostModel.build(model, "structured")
    inv = build_inventory(model)
    assert (model_cost.params_before, model_cost.macs_before) == (inv.params, inv.macs)
    assert model_cost.predict({}) == (inv.params, inv.macs)
    rng = random.Random(1)
    for seed in range(vectors):
        ratios = {t.name: rng.uniform(0.0, 0.9) for t in model_cost.targets}
        assert model_cost.predict(ratios) == measured(model, prune_for_real(model, ratios, seed))
    assert model.fingerprint() == fingerprint  # the loaded model is untouched


def test_structured_targets_are_the_scan_groups(cost, report) -> None:
    assert cost.names == [t.name for t in report.targets]
    assert [t.layers for t in cost.targets] == [t.layers for t in report.targets]
    assert all(t.params > 0 and t.macs > 0 for t in cost.targets)


@pytest.mark.parametrize("method", ["unstructured", "nm"])
def test_weight_methods_count_nonzeros_and_sparse_macs(demo, method) -> None:
    model_cost = CostModel.build(demo, method)
    rng = random.Random(2)
    ratios = {t.name: 0.5 if method == "nm" else rng.uniform(0, 0.9) for t in model_cost.targets}
    pruned = copy.deepcopy(demo.module)
    mods = dict(pruned.named_modules())
    inv = {layer.name: layer for layer in build_inventory(demo).layers}
    macs = sum(layer.macs for layer in inv.values())
    with torch.no_grad():
        for name, ratio in ratios.items():
            weight = mods[name].weight
            weight.mul_(weight_mask(weight, ratio, method, "l2"))
            macs -= round(inv[name].macs * float((weight == 0).float().mean()))
    nonzero = sum(int((p != 0).sum()) for p in pruned.parameters())
    assert model_cost.predict(ratios) == (nonzero, macs)


def test_blocks_predict_equals_removing_them(demo) -> None:
    from studio.core.models.blocks import remove_block

    model_cost = CostModel.build(demo, "blocks")
    assert model_cost.names == [f"layers.{i}" for i in range(9)]
    pruned = copy.deepcopy(demo.module)
    remove_block(pruned, "layers.3")  # a downsampling block: its 1x1 shortcut stays
    remove_block(pruned, "layers.7")
    ratios = {"layers.3": 1.0, "layers.7": 1.0, "layers.2": 0.2}
    assert model_cost.predict(ratios) == measured(demo, pruned)


@pytest.mark.parametrize("strategy", ["uniform", "global", "sensitivity"])
def test_strategies_land_on_half_the_macs(demo, cost, report, strategy) -> None:
    plan = PruningPlan(model_fingerprint="abc")
    result = allocate(cost, plan, strategy, "macs", 0.5, report=report)
    _, macs = cost.fractions(result.ratios)
    assert abs(macs - 0.5) <= 0.02
    assert result.target == {"kind": "macs", "fraction": 0.5, "allocate": strategy}
    assert set(result.ratios) == set(cost.names)
    assert max(result.ratios.values()) <= plan.cap
    assert result.model_fingerprint == "abc"
    assert plan.ratios == {}  # the input plan is a frozen value


def test_allocated_plan_is_exact_after_a_recipe_round_trip(demo, cost, report, tmp_path) -> None:
    result = allocate(cost, PruningPlan(), "sensitivity", "macs", 0.5, report=report)
    result = replace(result, round_to=4)
    result.save(tmp_path / "plan.yaml")
    again = PruningPlan.load(tmp_path / "plan.yaml")
    assert again.round_to == 4
    params, macs = cost.predict(again.ratios)
    assert (params, macs) == cost.predict(result.ratios)
    assert (params, macs) == measured(demo, prune_for_real(demo, again.active()))


@pytest.mark.parametrize("strategy", ["uniform", "global", "sensitivity"])
def test_round_to_keeps_multiples_of_eight_channels(demo, cost, report, strategy) -> None:
    plan = allocate(cost, PruningPlan(round_to=8), strategy, "macs", 0.5, report=report)
    assert abs(cost.fractions(plan.ratios)[1] - 0.5) <= 0.02
    assert plan.round_to == 8
    pruned = prune_for_real(demo, plan.active())
    for name, mod in pruned.named_modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.out_channels % 8 == 0, (name, mod.out_channels)
    assert measured(demo, pruned) == cost.predict(plan.ratios)
    exact = allocate(cost, PruningPlan(), strategy, "macs", 0.5, report=report)
    assert plan.ratios != exact.ratios  # the demo's exact allocations keep 11/23/45-like counts
    with pytest.raises(StudioError, match="round_to"):
        PruningPlan(round_to=0)


def test_sensitivity_predicts_less_drop_than_uniform(cost, report) -> None:
    drops = {}
    for strategy in ("uniform", "sensitivity"):
        result = allocate(cost, PruningPlan(), strategy, "macs", 0.5, report=report)
        drops[strategy] = predicted_drop(result.ratios, report)[0]
    assert drops["sensitivity"] < 0.5 * drops["uniform"]


def test_params_target_with_global_taylor(cost, val64) -> None:
    plan = PruningPlan(criterion="taylor")
    with pytest.raises(StudioError, match="needs data"):
        allocate(cost, plan, "global", "params", 0.6)
    result = allocate(cost, plan, "global", "params", 0.6, data=val64)
    assert abs(cost.fractions(result.ratios)[0] - 0.6) <= 0.02
    assert len(set(result.ratios.values())) > 3  # not uniform


def test_locked_and_ignored_are_respected(cost, report) -> None:
    plan = PruningPlan(
        ratios={"conv1": 0.5, "layers.6.conv1": 0.7},
        locked=("conv1",),
        ignored=("layers.3.conv1", "layers.6.conv1"),
    )
    for strategy in ("uniform", "sensitivity"):
        result = allocate(cost, plan, strategy, "macs", 0.5, report=report)
        assert result.ratios["conv1"] == 0.5
        assert result.ratio("layers.3.conv1") == 0.0 and result.ratio("layers.6.conv1") == 0.0
        effective = {n: result.ratio(n) for n in cost.names}
        assert abs(cost.fractions(effective)[1] - 0.5) <= 0.02


def test_cap_is_respected_and_an_unreachable_target_says_what_is(cost, report) -> None:
    plan = PruningPlan(cap=0.6)
    for strategy in ("uniform", "global", "sensitivity"):
        result = allocate(cost, plan, strategy, "macs", 0.4, report=report)
        assert max(result.ratios.values()) <= 0.6
    with pytest.raises(StudioError, match=r"cannot bring macs below 6\d\.\d% .*target 50"):
        allocate(cost, PruningPlan(cap=0.2), "uniform", "macs", 0.5)
    with pytest.raises(StudioError, match="cannot bring params below"):
        allocate(cost, PruningPlan(cap=0.5), "global", "params", 0.1)
    locked = PruningPlan(ratios={n: 0.8 for n in cost.names[:-1]}, locked=tuple(cost.names[:-1]))
    with pytest.raises(StudioError, match="locked ratios alone"):
        allocate(cost, locked, "uniform", "macs", 0.9)


def test_bad_requests_are_one_line_errors(cost, report) -> None:
    plan = PruningPlan()
    for args, message in (
        (("sideways", "macs", 0.5), "unknown allocation"),
        (("uniform", "energy", 0.5), "unknown target"),
        (("uniform", "latency", 0.5), "needs a latency predictor"),
        (("uniform", "macs", 1.5), "fraction to keep"),
        (("uniform", "macs", 0.0), "fraction to keep"),
        (("sensitivity", "macs", 0.5), "needs a sensitivity scan"),
    ):
        with pytest.raises(StudioError, match=message):
            allocate(cost, plan, *args)
    with pytest.raises(StudioError, match="the plan is unstructured"):
        allocate(cost, PruningPlan(method="unstructured"), "uniform", "macs", 0.5)
    assert allocate(cost, plan, "uniform", "macs", 1.0).active() == {}


def test_targets_missing_from_the_scan_are_named(cost, report) -> None:
    partial = copy.copy(report)
    partial.rows = [r for r in report.rows if r.layer not in ("conv1", "layers.8.conv1")]
    result = allocate(cost, PruningPlan(), "sensitivity", "macs", 0.6, report=partial)
    assert result.ratios["conv1"] == 0.0 and result.ratios["layers.8.conv1"] == 0.0
    assert "2 target(s) not in the scan" in result.target["note"]
    assert "conv1" in result.target["note"]


def test_predicted_drop_reads_the_curves(cost, report) -> None:
    names, ratios, grid = report.matrix()
    total, per = predicted_drop({}, report)
    assert total == 0.0 and set(per) == set(names)
    monotone = [i for i, row in enumerate(grid) if np.all(np.diff(row) >= 0) and row[0] >= 0]
    assert monotone, "the scan should have at least one monotone curve"
    name, row = names[monotone[0]], grid[monotone[0]]
    assert predicted_drop({name: 0.6}, report)[1][name] == pytest.approx(row[1])
    assert predicted_drop({name: 0.45}, report)[1][name] == pytest.approx((row[0] + row[1]) / 2)
    assert predicted_drop({name: 0.15}, report)[1][name] == pytest.approx(row[0] / 2)
    ratios_all = {n: 0.3 for n in names}
    total, per = predicted_drop(ratios_all, report)
    assert total == pytest.approx(sum(per.values()))
    assert total == pytest.approx(sum(max(0.0, v) for v in grid[:, 0]))


def test_load_scan_reads_the_cli_json(report, tmp_path) -> None:
    from studio.cli.scan import _scan_json

    path = tmp_path / "scan.json"
    path.write_text(json.dumps(_scan_json(report, "loss"), indent=1))
    loaded = load_scan(path)
    assert loaded.settings == report.settings
    assert loaded.targets == report.targets
    np.testing.assert_array_equal(loaded.matrix()[2], report.matrix()[2])
    assert predicted_drop({"conv1": 0.5}, loaded) == predicted_drop({"conv1": 0.5}, report)
    with pytest.raises(StudioError, match="does not exist"):
        load_scan(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StudioError, match="not valid JSON"):
        load_scan(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"settings": {"mode": "structured"}}))
    with pytest.raises(StudioError, match="not a sensitivity scan.*ratios"):
        load_scan(tmp_path / "other.json")


def test_nm_and_blocks_allocation(demo, val64) -> None:
    nm = CostModel.build(demo, "nm")
    result = allocate(nm, PruningPlan(method="nm"), "uniform", "macs", 0.5)
    assert set(result.ratios.values()) == {0.5}
    with pytest.raises(StudioError, match="sensitivity"):
        allocate(nm, PruningPlan(method="nm"), "global", "macs", 0.5)
    blocks = CostModel.build(demo, "blocks")
    plan = PruningPlan(method="blocks")
    with pytest.raises(StudioError, match="needs data"):
        allocate(blocks, plan, "sensitivity", "macs", 0.77, module=demo.module)
    result = allocate(blocks, plan, "sensitivity", "macs", 0.77, data=val64)
    assert result.active() == {"layers.2": 1.0, "layers.8": 1.0}  # the two least harmful
    assert abs(blocks.fractions(result.ratios)[1] - 0.77) <= 0.02


def test_latency_target_scans_a_non_monotone_family(cost):
    """Latency jumps with layouts: a dip in the uniform ratio, where bisection would stop far
    below the target; the scan takes the least pruning that lands within the tolerance."""

    class Dip:
        def __init__(self) -> None:
            self.cost, self.original_ms = cost, 1.0
            self.runtime, self.batch, self.threads = "onnxruntime", 1, 1

        def predict_ms(self, r: np.ndarray) -> float:
            x = float(np.max(r))
            return 0.4 if 0.25 < x < 0.5 else 1.0 - 0.5 * x

    plan = allocate(cost, PruningPlan("structured"), "uniform", "latency", 0.72, predictor=Dip())
    x = max(plan.ratios.values())
    achieved = Dip().predict_ms(np.array([x]))
    assert abs(achieved - 0.72) <= 0.02 and 0.5 < x < 0.6  # not in the dip
