"""The Planner tab: sliders and locks with undo/redo, live predictions, allocation, apply,
revert, and the recipe round trip to the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from studio.core.errors import StudioError
from studio.core.models.data import demo_splits
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.core.scan.sensitivity import SensitivityScan
from studio.core.scan.types import ScanSettings
from studio.ui.panels.compare_panel import ComparePanel
from studio.ui.panels.planner_panel import PlannerPanel
from studio.ui.panels.planner_table import DROP, MACS, PARAMS
from studio.ui.panels.sparsity_panel import SparsityPanel
from studio.ui.runner import JobRunner
from studio.ui.session import Session


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    model = load_model("demo")
    data = demo_splits()[1].subset(96)
    scan = SensitivityScan(model, data, ScanSettings(ratios=(0.25, 0.5, 0.75)), use_cache=False)
    scan.prepare()
    for _ in scan.run():
        pass
    return model, build_inventory(model), data, scan.report


@pytest.fixture
def planner(qtbot, demo):  # type: ignore[no-untyped-def]
    model, inventory, data, _ = demo
    session, runner = Session(), JobRunner()
    panel = PlannerPanel(session, runner)
    qtbot.addWidget(panel)
    panel.resize(1100, 700)
    panel.show()
    with qtbot.waitSignal(panel.state.reset, timeout=60_000):
        session.set_model(model)
    qtbot.waitUntil(lambda: panel.state.cost is not None, timeout=60_000)
    session.set_inventory(inventory)
    session.set_data(data)
    yield panel
    runner.shutdown(timeout=60)


def test_sliders_predict_live_and_undo_whole_gestures(qtbot, planner: PlannerPanel) -> None:
    state, table = planner.state, planner.table
    cost = state.cost
    assert table.rowCount() == len(cost.targets) == 12
    assert cost.params_before == 272_186 and cost.macs_before == 40_718_976
    first = cost.targets[0].name
    slider = table.sliders[first]
    slider.setValue(0.5)  # a typed or keyboard value: one undo step
    assert state.plan.ratio(first) == pytest.approx(0.5)
    params, macs = cost.predict({first: 0.5})
    qtbot.waitUntil(lambda: f"→ {params:,}" in planner.summary.text(), timeout=2000)
    assert "→" in table.item(0, PARAMS).text() and "→" in table.item(0, MACS).text()
    # a drag previews without undo steps and commits one on release
    slider._slider.setSliderDown(True)
    for value in (0.55, 0.6, 0.7):
        slider.setValue(value)
    slider._slider.setSliderDown(False)
    assert state.plan.ratio(first) == pytest.approx(0.7)
    assert state.undo_stack.count() == 2
    planner.undo_button.click()
    assert state.plan.ratio(first) == pytest.approx(0.5) and slider.value() == pytest.approx(0.5)
    planner.undo_button.click()
    assert state.plan.ratio(first) == 0.0
    planner.redo_button.click()
    assert state.plan.ratio(first) == pytest.approx(0.5)
    table.locks[first].setChecked(True)
    assert first in state.plan.locked
    planner.undo_button.click()
    assert first not in state.plan.locked and not table.locks[first].isChecked()


def test_scan_predicts_drops_and_sensitivity_allocation_meets_the_target(
    qtbot, planner: PlannerPanel, demo
) -> None:
    report = demo[3]
    planner.session.set_scan(report)
    planner.kind.setCurrentText("MACs")
    planner.keep.setValue(50.0)
    planner.strategy.setCurrentText("sensitivity")
    with qtbot.waitSignal(planner.state.changed, timeout=60_000):
        assert planner.allocate() is not None
    qtbot.waitUntil(lambda: not planner.running("allocate"), timeout=10_000)
    prediction = planner.state.predict()
    assert abs(prediction.macs / planner.state.cost.macs_before - 0.5) <= 0.02
    assert prediction.drop is not None and prediction.drop > 0
    qtbot.waitUntil(lambda: "points (sum of" in planner.summary.text(), timeout=2000)
    pruned_rows = [
        r for r, t in enumerate(planner.state.targets) if planner.state.plan.ratio(t.name) > 0
    ]
    assert pruned_rows and all(planner.table.item(r, DROP).text() != "—" for r in pruned_rows)
    planner.undo_button.click()  # the whole allocation is one step
    assert not planner.state.plan.active()
    planner.round_to.setCurrentText("×8")
    assert planner.state.plan.round_to == 8
    with qtbot.waitSignal(planner.state.changed, timeout=60_000):
        planner.allocate()
    qtbot.waitUntil(lambda: not planner.running("allocate"), timeout=10_000)
    cost = planner.state.cost
    out, _ = cost.channels_vector(cost.ratio_vector(planner.state.plan.ratios))
    rounded = [int(c) for c, row in zip(out, cost.rows) if "conv" in row]
    assert rounded and all(c % 8 == 0 for c in rounded)


def test_apply_compare_sparsity_and_revert(qtbot, planner: PlannerPanel, demo) -> None:
    model = demo[0]
    fingerprint = model.fingerprint()
    compare = ComparePanel(planner.session)
    sparsity = SparsityPanel(planner.session, planner.runner)
    qtbot.addWidget(compare)
    qtbot.addWidget(sparsity)
    names = [t.name for t in planner.state.targets]
    planner.state.set_all({n: 0.5 for n in names}, "half")
    with qtbot.waitSignal(planner.session.pruned_changed, timeout=120_000) as done:
        planner.apply_button.click()
    result = done.args[0]
    assert result.params_after < result.params_before
    assert sum(p.numel() for p in result.module.parameters()) == result.params_after
    assert any("96 samples" in note for note in result.notes)  # BN re-estimated on the data
    planner.session.set_data(demo_splits()[1])  # the demo's validation split: BN on training
    with qtbot.waitSignal(planner.session.pruned_changed, timeout=120_000) as done:
        planner.apply_button.click()
    assert any("1,437 samples of digits (train)" in note for note in done.args[0].notes)
    planner.session.set_data(demo[2])
    assert model.fingerprint() == fingerprint  # the loaded model was not touched
    assert compare.table.rowCount() > 20 and "→" in compare.header.text()
    assert any(after < before for *_, before, after in compare.rows)
    qtbot.waitUntil(
        lambda: sparsity.subject == "the pruned model" and bool(sparsity.layers), timeout=10_000
    )
    assert sum(len(c.norms) for c in sparsity.layers) < sum(
        m.weight.shape[0]
        for m in model.module.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    )
    assert planner.revert_button.isEnabled()
    planner.revert_button.click()
    assert planner.session.pruned is None and compare.table.rowCount() == 0


def test_recipe_from_the_gui_replays_identically_in_the_cli(
    qtbot, planner: PlannerPanel, tmp_path: Path, capsys
) -> None:
    from studio.cli import main

    names = [t.name for t in planner.state.targets]
    planner.state.set_all({names[1]: 0.3, names[5]: 0.6}, "two")
    planner.recalibrate.setChecked(False)  # the CLI below replays without data
    recipe = planner.save_recipe(tmp_path / "plan.yaml")
    assert "recalibrate_bn: false" in recipe.read_text()
    with qtbot.waitSignal(planner.session.pruned_changed, timeout=120_000) as done:
        planner.apply()
    gui_state = done.args[0].module.state_dict()
    out = tmp_path / "pruned.pt2"
    assert main(["prune", "--model", "demo", "--recipe", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    cli_model = load_model(str(out))
    cli_state = cli_model.module.state_dict()
    weights = {k: v for k, v in gui_state.items() if v.is_floating_point()}
    for key, tensor in weights.items():
        assert torch.equal(cli_state[key], tensor), key

    planner.state.set_all({}, "clear")
    planner.recalibrate.setChecked(True)
    planner.load_recipe(recipe)
    assert planner.state.plan.ratio(names[5]) == pytest.approx(0.6)
    assert not planner.recalibrate.isChecked() and not planner.state.plan.recalibrate_bn
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: structured\nratios: {nowhere.conv: 0.5}\n")
    with qtbot.waitSignal(planner.error, timeout=2000) as error:
        planner.load_recipe(bad)
    assert "does not have" in error.args[1]
    with pytest.raises(StudioError, match="not valid YAML"):
        (tmp_path / "junk.yaml").write_text("ratios: [unclosed")
        planner.load_recipe(tmp_path / "junk.yaml")


def test_nothing_to_apply_and_blocks_method(qtbot, planner: PlannerPanel) -> None:
    assert not planner.apply_button.isEnabled()
    with qtbot.waitSignal(planner.error, timeout=2000) as error:
        assert planner.apply() is None
    assert "every ratio is 0" in error.args[1]
    with qtbot.waitSignal(planner.state.reset, timeout=60_000):
        planner.method.setCurrentText("blocks")
    qtbot.waitUntil(lambda: planner.state.cost is not None, timeout=60_000)
    assert planner.state.plan.method == "blocks"
    assert [t.name for t in planner.state.targets][:1] == ["layers.0"]
    assert planner.table.sliders["layers.0"].maximum() == 1.0
    planner.table.sliders["layers.0"].setValue(1.0)
    assert planner.state.plan.ratio("layers.0") == 1.0


class FakePredictor:
    """Latency proportional to MACs: what the Planner does with a predictor, not its accuracy
    (that is benchmarks/latency_prediction.py's job)."""

    def __init__(self, cost) -> None:  # type: ignore[no-untyped-def]
        self.cost, self.original_ms, self.threads = cost, 2.0, 2
        self.runtime, self.batch = "onnxruntime", 1
        self.measured_ms, self.calibrated_points = None, 0

    def predict_ms(self, r) -> float:  # type: ignore[no-untyped-def]
        return 2.0 * self.cost.predict_vector(r)[1] / self.cost.macs_before

    def predict(self, plan):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        r = self.cost.ratio_vector({n: plan.ratio(n) for n in self.cost.names})
        return SimpleNamespace(total_ms=self.predict_ms(r))


def test_latency_estimate_follows_the_plan_and_meets_a_latency_target(
    qtbot, planner: PlannerPanel, monkeypatch
) -> None:
    from studio.core.latency import predict as latency_predict

    built = []

    def build(model, runtime, batch, threads, progress=None, cancel=None, cost=None):  # type: ignore[no-untyped-def]
        built.append((runtime, batch, cost))
        return FakePredictor(cost)

    monkeypatch.setattr(latency_predict.LatencyPredictor, "build", staticmethod(build))
    monkeypatch.setenv("STUDIO_IN_PROCESS", "1")  # the stand-in is seen in this process only
    planner.kind.setCurrentText("latency (estimated)")
    planner.keep.setValue(60.0)
    planner.strategy.setCurrentText("uniform")  # on runtime channels, the default
    with qtbot.waitSignal(planner.state.changed, timeout=60_000):
        assert planner.allocate() is not None  # builds the predictor, then allocates
    qtbot.waitUntil(lambda: not planner.running("allocate"), timeout=120_000)
    assert built and built[0][:2] == ("onnxruntime", 1) and built[0][2] is planner.state.cost
    predictor = planner.latency.predictor
    assert predictor is not None and not planner.latency_button.isEnabled()
    plan = planner.state.plan
    # the estimate's plan was the first candidate; the plan kept is the one measured nearest
    target = planner.last_allocation.target
    assert planner.last_allocation.ratios == plan.ratios
    assert target["kind"] == "latency" and target["candidates"] >= 1
    assert abs(target["measured"] / 0.6 - 1.0) <= 0.10
    planner.update_summary()
    assert (
        "<b>Latency</b> 2.000 →" in planner.summary.text() and "estimated" in planner.summary.text()
    )
    planner.clear()
    planner.update_summary()
    assert "2.000 → 2.000 ms" in planner.summary.text()  # follows every change


def test_sensitivity_without_a_scan_offers_it_then_reads_the_cache(
    qtbot, planner: PlannerPanel
) -> None:
    data = demo_splits()[1].subset(40)  # data no other test scanned: nothing cached yet
    planner.session.set_data(data)
    assert planner.session.scan is None
    planner.kind.setCurrentText("MACs")
    planner.keep.setValue(50.0)
    planner.strategy.setCurrentText("sensitivity")
    assert planner.round_to.currentText().startswith("runtime ×")  # the default
    asked: list = []
    planner.ask.connect(lambda _title, question, on_yes: asked.append((question, on_yes)))
    assert planner.allocate() is not None
    qtbot.waitUntil(lambda: bool(asked), timeout=60_000)
    assert "not cached" in asked[0][0] and not planner.state.plan.active()
    asked[0][1]()  # Yes: the scan runs, then the allocation
    qtbot.waitUntil(
        lambda: bool(planner.state.plan.active()) and not planner.running("allocate"),
        timeout=180_000,
    )
    report = planner.session.scan
    assert report is not None and report.settings.mode == "structured"
    cost = planner.state.cost
    assert cost.fractions(planner.state.plan.ratios)[1] <= 0.52
    out, _ = cost.channels_vector(cost.ratio_vector(planner.state.plan.ratios))
    multiple = int(planner.round_to.currentData())
    assert all(c % multiple == 0 for c, row in zip(out, cost.rows) if "conv" in row)
    # a new session on the same model and data: the cached scan is read, nothing is asked
    planner.session.set_data(data)
    planner.clear()
    asked.clear()
    planner.allocate()
    qtbot.waitUntil(
        lambda: bool(planner.state.plan.active()) and not planner.running("allocate"),
        timeout=60_000,
    )
    assert not asked and planner.session.scan is not None
    assert planner.session.scan.cached_rows == len(planner.session.scan.rows)
