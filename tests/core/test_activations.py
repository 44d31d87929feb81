"""Activation-based importance: APoZ and mean activation measured after the activation, dead
channels pruned first by the engine, the structured scan ranking the same way (exact = naive),
global allocation, and the criteria in ``studio prune`` / ``studio scan``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from studio.cli import main
from studio.core.errors import StudioError
from studio.core.models.activations import channel_activation_stats
from studio.core.models.data import DataSet
from studio.core.models.load import load_model
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.plan.costs import CostModel
from studio.core.plan.importance import normalised_scores
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune
from studio.core.scan.sensitivity import SensitivityScan
from studio.core.scan.types import ScanSettings

DEAD, LOUD = 0, 1  # channels of the first conv: always zero after the ReLU / always large


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gated_net() -> LoadedModel:
    """conv -> BN -> ReLU -> conv -> ReLU -> pool -> linear, with channel 0 of the first BN
    shifted so far down that the ReLU always zeroes it, channel 1 so far up it never does."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()
    with torch.no_grad():
        module[1].bias[DEAD] = -100.0
        module[1].bias[LOUD] = 100.0
        module[0].weight[DEAD].mul_(50)  # the largest weights: magnitude would keep it
    return LoadedModel(module, "gated", "gated", EAGER, (1, 1, 8, 8))


@pytest.fixture(scope="module")
def data() -> DataSet:
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return DataSet(x, torch.arange(40) % 3, "noise")


def test_stats_are_taken_after_the_activation(data) -> None:
    model = gated_net()
    stats = channel_activation_stats(model, data)
    assert set(stats) == {"0", "3", "7"}
    apoz, mean = stats["0"]
    assert apoz.shape == (8,) and mean.shape == (8,)
    assert apoz[DEAD] == 1.0 and mean[DEAD] == 0.0  # measured after the ReLU
    assert apoz[LOUD] == 0.0 and mean[LOUD] > 50
    assert np.all((apoz >= 0) & (apoz <= 1))
    # by hand: ReLU(BN(conv(x))) for the first layer
    with torch.no_grad():
        out = model.module[:3](data.x.clone())
    assert np.allclose(apoz, (out <= 0).double().mean((0, 2, 3)).numpy())
    assert np.allclose(mean, out.abs().double().mean((0, 2, 3)).numpy(), rtol=1e-5)
    assert set(channel_activation_stats(model, data, ["3"])) == {"3"}
    with pytest.raises(StudioError, match="no conv or linear layer named 'x'"):
        channel_activation_stats(model, data, ["x"])
    assert not model.module.training and not model.module[0]._forward_hooks  # hooks removed


@pytest.mark.parametrize("criterion", ["apoz", "activation"])
def test_engine_prunes_the_dead_channel_first(data, criterion: str) -> None:
    model = gated_net()
    plan = PruningPlan("structured", criterion, ratios={"0": 0.125}, recalibrate_bn=False)
    with pytest.raises(StudioError, match=f"the {criterion} criterion needs data"):
        prune(model, plan)
    result = prune(model, plan, data)
    kept = result.module[1].bias.detach()
    assert len(kept) == 7 and float(kept.min()) > -100  # the dead channel went
    l2 = prune(model, PruningPlan("structured", "l2", ratios={"0": 0.125}, recalibrate_bn=False))
    assert float(l2.module[1].bias.detach().min()) == -100  # l2 keeps it: large weights
    unstructured = PruningPlan("unstructured", criterion, ratios={"0": 0.5})
    with pytest.raises(StudioError, match="ranks channels"):
        prune(model, unstructured, data)


def test_scan_with_apoz_ranks_like_the_engine_and_exact_equals_naive(data) -> None:
    model = gated_net()
    rows = {}
    for method in ("exact", "naive"):
        settings = ScanSettings(criterion="apoz", method=method, ratios=(0.125, 0.5))
        scan = SensitivityScan(model, data, settings, use_cache=False, workers=1)
        scan.prepare()
        rows[method] = {(r.layer, r.ratio): r for r in scan.run()}
    assert rows["exact"].keys() == rows["naive"].keys()
    for key, row in rows["exact"].items():
        assert row.loss == pytest.approx(rows["naive"][key].loss, abs=1e-4)
    # removing the dead channel changes nothing; the engine's result agrees with the scan row
    dead = rows["exact"][("0", 0.125)]
    assert dead.agreement == 1.0
    plan = PruningPlan("structured", "apoz", ratios={"0": 0.5}, recalibrate_bn=False)
    after = prune(model, plan, data).quality_after
    assert after is not None and after.loss == pytest.approx(rows["exact"][("0", 0.5)].loss, 1e-4)
    with pytest.raises(StudioError, match="ranks channels"):
        ScanSettings(mode="unstructured", criterion="apoz")


def test_global_allocation_ranks_by_activations(data) -> None:
    model = gated_net()
    cost = CostModel.build(model, "structured")
    scores = normalised_scores(cost, "activation", data=data)
    assert set(scores) == set(cost.names)
    assert scores["0"][0] == 0.0  # the dead channel scores lowest (sorted)
    with pytest.raises(StudioError, match="measures activations on data"):
        normalised_scores(cost, "apoz")


def test_cli_scan_and_prune_accept_activation_criteria(capsys, tmp_path) -> None:
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=(np.arange(32) % 10))
    data = str(tmp_path / "d.npz")
    common = ["--model", "zoo:vgg11", "--input-shape", "1,1,8,8", "--data", data]
    code = main(
        ["scan", *common, "--criterion", "apoz", "--ratios", "0.5", "--workers", "1", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["rows"] == json.loads(out)["targets"] > 0
    prune_args = ["prune", *common, "--ratio", "0.3", "--out", str(tmp_path / "p.pt"), "--json"]
    code = main([*prune_args, "--criterion", "activation"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["criterion"] == "activation"
    assert load_model(str(tmp_path / "p.pt")).module is not None
    code = main(["prune", "--model", "demo", "--ratio", "0.3", "--criterion", "apoz", "--out",
                 str(tmp_path / "q.pt")])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 1 and "needs data" in err
