"""The pruning engine: every method and criterion, rollback, the loaded model left alone,
agreement with the sensitivity scan, recipes and saved models that load back safely."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken
from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.models.loaded import EAGER, LoadedModel
from studio.core.models.loaders import load_file
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets, save_pruned
from studio.core.scan.masks import nm_view
from studio.core.scan.sensitivity import SensitivityScan
from studio.core.scan.types import ScanSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model("demo")


@pytest.fixture(scope="module")
def val64():
    return demo_splits()[1].subset(64)


def uniform(model: LoadedModel, method: str, ratio: float, **kwargs: object) -> PruningPlan:
    names = prune_targets(model, method)
    return PruningPlan(method, ratios={n: ratio for n in names}, **kwargs)  # type: ignore[arg-type]


def tensor_numel(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


# ---- structured ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_rows(demo, val64) -> dict[tuple[str, float], object]:
    job = SensitivityScan(demo, val64, ScanSettings(ratios=(0.3, 0.5)), use_cache=False, workers=1)
    job.prepare()
    torch.set_num_threads(1)  # prepare() asks for every core
    return {(row.layer, row.ratio): row for row in job.run()}


@pytest.mark.parametrize(
    "group, ratio", [("layers.3.shortcut.0", 0.5), ("layers.6.shortcut.0", 0.5), ("conv1", 0.3)]
)
def test_structured_removes_the_channels_the_scan_removes(demo, val64, scan_rows, group, ratio):
    plan = PruningPlan("structured", "l2", {group: ratio}, recalibrate_bn=False)  # as scanned
    result = prune(demo, plan, val64)
    row = scan_rows[(group, ratio)]
    assert result.quality_after is not None and result.quality_after.accuracy is not None
    assert row.accuracy < 0.95  # the group matters: the wrong channels would show
    assert abs(result.quality_after.accuracy - row.accuracy) <= 1e-6
    assert abs(result.quality_after.loss - row.loss) <= 1e-4
    assert result.params_after < result.params_before


def test_structured_demo_uniform_is_smaller_and_leaves_the_model_alone(demo, val64) -> None:
    before = demo.fingerprint()
    result = prune(demo, uniform(demo, "structured", 0.5), val64)
    assert demo.fingerprint() == before
    assert result.module is not demo.module
    # every group halved: the stem keeps 8 of 16 channels, the last stage 32 of 64
    mods = dict(result.module.named_modules())
    assert mods["conv1"].out_channels == 8 and mods["layers.8.conv2"].out_channels == 32
    assert mods["fc"].out_features == 10  # output layers are never pruned
    assert tensor_numel(result.module) < tensor_numel(demo.module)
    assert result.params_after == sum(p.numel() for p in result.module.parameters())
    assert 0.2 < result.params_after / result.params_before < 0.3
    assert 0.2 < result.macs_after / result.macs_before < 0.3
    assert result.size_after < result.size_before / 3
    assert result.compression == pytest.approx(result.params_before / result.params_after)
    assert result.quality_before.accuracy > 0.95  # type: ignore[union-attr]
    shapes = {name: (b, a) for name, b, a in result.shapes}
    assert shapes["conv1"] == ((16, 1, 3, 3), (8, 1, 3, 3))
    assert result.model.name.endswith("(pruned)") and result.model.arch == "resnet20"
    assert run(result.module, val64.x[:3]).shape == (3, 10)


@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "vgg11", "mobilenetv2", "vit", "lstm"])
def test_structured_on_every_zoo_architecture(arch: str) -> None:
    model = load_model(f"zoo:{arch}")
    before = model.fingerprint()
    x = model.example_input(2)
    reference = run(model.module, x)
    names = prune_targets(model, "structured")
    result = prune(model, PruningPlan("structured", ratios={n: 0.5 for n in names}))
    assert model.fingerprint() == before
    assert run(model.module, x).equal(reference)
    assert run(result.module, x).shape == reference.shape
    mods = dict(result.module.named_modules())
    if arch == "lstm":  # its hidden units cannot go: nothing to prune, and it says why
        assert names == [] and result.params_after == result.params_before
        assert [n for n, _ in result.skipped] == ["lstm"]
        assert "recurrent" in result.skipped[0][1]
        return
    assert result.skipped == []
    assert tensor_numel(result.module) < 0.45 * tensor_numel(model.module)
    if arch == "mobilenetv2":  # depthwise convs follow their expansion layer's channels
        original = dict(model.module.named_modules())
        depthwise = [n for n, m in mods.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert depthwise
        for name in depthwise:
            conv = mods[name]
            assert conv.groups == conv.in_channels == conv.out_channels
            assert conv.out_channels < original[name].out_channels
    if arch == "vit":  # q, k, v lose the same dimensions in every head; the MLP shrinks
        attn = mods["blocks.0.attn"]
        assert attn.qkv.out_features == 3 * 4 * 8  # 4 heads of 16 -> 8 dimensions
        assert mods["blocks.0.mlp.fc1"].out_features == 64
        assert mods["patch_embed"].out_channels == 32


def test_a_group_that_breaks_the_model_is_rolled_back_and_the_rest_applies() -> None:
    class HardCodedReshape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1, self.relu = (
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
            )
            self.conv2, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv2(self.relu(self.bn1(self.conv1(x))))
            return self.fc(x.reshape(x.shape[0], 16, -1).mean(-1))  # 16 written in the code

    model = LoadedModel(HardCodedReshape().eval(), "toy", "toy", EAGER, (1, 3, 8, 8))
    result = prune(model, PruningPlan("structured", ratios={"conv1": 0.5, "conv2": 0.5}))
    assert [n for n, _ in result.skipped] == ["conv2"]
    assert result.skipped[0][1].startswith("rolled back: the model no longer runs")
    pruned = result.module
    assert pruned.conv1.out_channels == 4 and pruned.bn1.num_features == 4
    assert pruned.conv2.in_channels == 4 and pruned.conv2.out_channels == 16
    assert run(pruned, torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> dict[str, LoadedModel]:
    from studio.core.models import zoo

    folder = tmp_path_factory.mktemp("onnx")
    loaded = {}
    for name in ("resnet20", "vit"):
        path = folder / f"{name}.onnx"
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                zoo.build(name).eval(),
                (torch.randn(1, 1, 32, 32),),
                str(path),
                dynamo=False,
                input_names=["image"],
                dynamic_axes={"image": {0: "batch"}},
            )
            loaded[name] = load_file(path)
    return loaded


def test_structured_on_onnx_imports(onnx_models, tmp_path: Path) -> None:
    resnet = onnx_models["resnet20"]
    before = resnet.fingerprint()
    result = prune(resnet, uniform(resnet, "structured", 0.5))
    assert resnet.fingerprint() == before and result.skipped == []
    assert result.macs_after < 0.3 * result.macs_before
    assert tensor_numel(result.module) < 0.3 * tensor_numel(resnet.module)
    assert run(result.module, resnet.example_input(2)).shape == (2, 10)
    assert result.model.kind == "onnx"
    # the ViT's class token is a constant of the ONNX graph: its embedding cannot shrink, but
    # its MLPs (MatMul + Add in the file, read as linear layers) can
    vit = onnx_models["vit"]
    result = prune(vit, uniform(vit, "structured", 0.5))
    reasons = [r for _, r in result.skipped]
    assert reasons and all(r.startswith(("rolled back:", "left whole:")) for r in reasons)
    assert result.params_after < 0.9 * result.params_before
    assert run(result.module, vit.example_input(2)).shape == (2, 10)
    # an ONNX import has no built-in architecture to rebuild: .pt is refused, .pt2 works
    with pytest.raises(StudioError, match=r"save it as out\.pt2"):
        save_pruned(result, tmp_path / "out.pt")
    pruned = prune(resnet, uniform(resnet, "structured", 0.5))
    save_pruned(pruned, tmp_path / "out.pt2")
    reloaded = load_file(tmp_path / "out.pt2")
    x = resnet.example_input(3)
    assert reloaded.kind == "exported"
    assert torch.allclose(run(reloaded.module, x), run(pruned.module, x), atol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "taylor", "bn_scale", "random"])
def test_other_criteria_keep_the_shapes_and_choose_their_own_channels(demo, val64, criterion):
    plan = PruningPlan("structured", criterion, {"layers.0.conv1": 0.5}, seed=1)
    result = prune(demo, plan, val64)
    bn = dict(result.module.named_modules())["layers.0.bn1"]
    gamma = demo.module.layers[0].bn1.weight.detach()
    assert bn.num_features == 8
    # which of the 16 channels survived, found by their batch norm scale
    kept = sorted(int((gamma == w).nonzero()[0]) for w in bn.weight.detach())
    if criterion == "bn_scale":
        assert kept == sorted(gamma.abs().argsort(descending=True)[:8].tolist())
    if criterion == "random":
        assert prune(demo, plan).module.state_dict()["layers.0.bn1.weight"].equal(bn.weight)
        other = prune(demo, PruningPlan("structured", "random", plan.ratios, seed=2))
        assert not other.module.state_dict()["layers.0.bn1.weight"].equal(bn.weight)


def test_taylor_needs_data_and_bn_scale_falls_back_without_batch_norm(demo) -> None:
    with pytest.raises(StudioError, match="taylor criterion needs data"):
        prune(demo, PruningPlan("structured", "taylor", {"conv1": 0.5}))
    vit = load_model("zoo:vit")
    result = prune(vit, PruningPlan("structured", "bn_scale", {"blocks.0.mlp.fc1": 0.5}))
    assert "no batch norm" in result.notes[0]
    assert dict(result.module.named_modules())["blocks.0.mlp.fc1"].out_features == 64


# ---- unstructured, nm, blocks --------------------------------------------------------------


def test_unstructured_zeroes_the_ratio_of_every_layer_permanently(demo) -> None:
    plan = uniform(demo, "unstructured", 0.8)
    result = prune(demo, plan)
    mods = dict(result.module.named_modules())
    for name in plan.ratios:
        weight = mods[name].weight
        assert abs(float((weight == 0).float().mean()) - 0.8) <= 1.0 / weight.numel()
        assert not nn.utils.parametrize.is_parametrized(mods[name])
        assert not mods[name]._forward_pre_hooks and not mods[name]._forward_hooks
    assert set(result.module.state_dict()) == set(demo.module.state_dict())
    assert result.sparsity == pytest.approx(0.8, abs=1e-3)
    assert result.params_after == result.params_before
    assert result.compression == pytest.approx(1 / 0.2, rel=0.05)
    assert float((demo.module.conv1.weight == 0).sum()) == 0  # the original keeps its weights


def test_nm_leaves_at_most_two_of_every_four(demo) -> None:
    plan = uniform(demo, "nm", 0.5)
    assert "conv1" not in plan.ratios  # one input channel: no groups of 4 along its rows
    result = prune(demo, plan)
    mods = dict(result.module.named_modules())
    for name in plan.ratios:
        nonzero = (nm_view(mods[name].weight) != 0).sum(-1)
        assert int(nonzero.max()) <= 2 and int(nonzero.min()) == 2


def test_blocks_are_replaced_by_their_shortcut(demo, val64, tmp_path: Path) -> None:
    names = prune_targets(demo, "blocks")
    assert names == [f"layers.{i}" for i in range(9)]  # identity and downsample shortcuts
    before = demo.fingerprint()
    result = prune(demo, PruningPlan("blocks", ratios={"layers.1": 1.0, "layers.3": 1.0}), val64)
    assert demo.fingerprint() == before
    layers = demo.module.layers
    gone = sum(p.numel() for p in layers[1].parameters())
    gone += sum(p.numel() for n, p in layers[3].named_parameters() if not n.startswith("shortcut"))
    assert result.params_before - result.params_after == gone
    x = val64.x[:4]
    with torch.no_grad():  # layers.1 became the identity (its input is already a ReLU output)
        stem = demo.module.relu(demo.module.bn1(demo.module.conv1(x)))
        block1 = result.module.layers[1](layers[0](stem))
        assert block1.equal(layers[0](stem))
    save_pruned(result, tmp_path / "blocks.pt")
    reloaded = load_model(str(tmp_path / "blocks.pt"))
    assert run(reloaded.module, x).equal(run(result.module, x))


# ---- recipes, saving, errors, cancel -------------------------------------------------------


def test_recipe_round_trip_gives_an_identical_model(demo, tmp_path: Path) -> None:
    ratios = {n: 0.1 * (i % 6) for i, n in enumerate(prune_targets(demo, "structured"))}
    plan = PruningPlan("structured", "l1", ratios, model_fingerprint=demo.fingerprint())
    first = prune(demo, plan)
    plan.save(tmp_path / "recipe.yaml")
    second = prune(demo, PruningPlan.load(tmp_path / "recipe.yaml"))
    a, b = first.module.state_dict(), second.module.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_saved_model_reloads_without_trusting_pickles(demo, tmp_path: Path) -> None:
    result = prune(demo, uniform(demo, "structured", 0.4))
    path = save_pruned(result, tmp_path / "pruned.pt", protected=(tmp_path / "x.pt",))
    reloaded = load_model(str(path))  # trust_pickle is False
    assert reloaded.kind == EAGER and reloaded.arch == "resnet20"
    x = demo.example_input(4)
    assert run(reloaded.module, x).equal(run(result.module, x))
    # it is an ordinary eager model: it can be pruned again, and saved again
    again = prune(reloaded, uniform(reloaded, "structured", 0.5))
    assert again.params_after < result.params_after
    save_pruned(again, tmp_path / "twice.pt")
    assert load_model(str(tmp_path / "twice.pt")).module.conv1.out_channels == 5
    with pytest.raises(StudioError, match="refusing to write over"):
        save_pruned(result, path, protected=(path,))
    with pytest.raises(StudioError, match=r"\.pt, \.pt2 or \.onnx, not \.tflite"):
        save_pruned(result, tmp_path / "pruned.tflite")


def test_plans_for_another_model_or_unknown_layers_are_refused(demo) -> None:
    with pytest.raises(StudioError, match="made for another model"):
        prune(demo, PruningPlan(ratios={"conv1": 0.5}, model_fingerprint="0" * 16))
    with pytest.raises(StudioError, match="1 layer"):
        prune(demo, PruningPlan(ratios={"no.such.layer": 0.5}))
    with pytest.raises(StudioError, match="bn_scale"):
        prune(demo, PruningPlan("unstructured", "bn_scale", {"layers.0.conv1": 0.5}))


def test_progress_and_cancel(demo) -> None:
    seen: list[float] = []
    prune(demo, uniform(demo, "structured", 0.2), progress=lambda f, _m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 12
    token = CancelToken()
    calls = []

    def cancel_soon(fraction: float, _message: str) -> None:
        calls.append(fraction)
        if fraction > 0.3:
            token.cancel()

    with pytest.raises(Cancelled):
        prune(demo, uniform(demo, "structured", 0.2), progress=cancel_soon, cancel=token)
    assert max(calls) < 1.0


def test_batch_norm_recalibration_restores_accuracy_without_touching_weights(demo, val64) -> None:
    train = demo_splits()[0].subset(256)
    plan = uniform(demo, "structured", 0.5)
    kept = prune(demo, PruningPlan(**{**plan.__dict__, "recalibrate_bn": False}), val64)
    fresh = prune(demo, plan, val64, calibration=train)
    assert "re-estimated on 256 samples of digits (train)" in fresh.notes[-1]
    before, after = kept.module.state_dict(), fresh.module.state_dict()
    for key, tensor in before.items():
        if "running" in key:
            assert not torch.equal(tensor, after[key]), key  # new statistics
        elif tensor.is_floating_point():
            assert torch.equal(tensor, after[key]), key  # the same weights
    assert kept.quality_after.accuracy < 0.5 < fresh.quality_after.accuracy
    assert kept.quality_before == fresh.quality_before
    no_data = prune(demo, plan)
    assert "kept from the unpruned model" in no_data.notes[-1]
