"""The Latency tab: every variant measured (and estimated), the per-layer profile, and the
quality-against-latency chart with its Pareto front."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from studio.core.latency import predict as latency_predict
from studio.core.models.data import demo_splits
from studio.core.models.evaluate import evaluate
from studio.core.models.inventory import build_inventory
from studio.core.models.load import load_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets
from studio.ui.panels.latency_panel import COLUMNS, LatencyPanel
from studio.ui.runner import JobRunner
from studio.ui.session import Session
from studio.ui.widgets.pareto_chart import pareto_front


def test_pareto_front_keeps_the_non_dominated_points() -> None:
    costs = [1.0, 2.0, 1.5, 3.0, 0.5, 2.0]
    quality = [0.90, 0.95, 0.80, 0.99, 0.50, 0.97]
    assert pareto_front(costs, quality) == [4, 0, 5, 3]
    assert pareto_front([], []) == []


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    model = load_model("demo")
    data = demo_splits()[1].subset(64)
    names = prune_targets(model, "structured")
    plan = PruningPlan("structured", ratios={n: 0.5 for n in names}, recalibrate_bn=False)
    return model, data, prune(model, plan, data)


@pytest.fixture
def panel(qtbot, demo, monkeypatch):  # type: ignore[no-untyped-def]
    predicted: list[PruningPlan] = []
    anchors: list[float] = []

    def build(model, runtime, batch, threads, progress=None, cancel=None, **_):  # type: ignore[no-untyped-def]
        def predict(plan):  # type: ignore[no-untyped-def]
            predicted.append(plan)
            return SimpleNamespace(total_ms=1.0 - 0.5 * bool(plan.active()))

        return SimpleNamespace(predict=predict, anchor_to=lambda ms: anchors.append(ms))

    monkeypatch.setattr(latency_predict.LatencyPredictor, "build", staticmethod(build))
    monkeypatch.setenv("STUDIO_IN_PROCESS", "1")  # the stand-in is seen in this process only
    model, data, result = demo
    session, runner = Session(), JobRunner()
    panel = LatencyPanel(session, runner)
    qtbot.addWidget(panel)
    panel.resize(1200, 700)
    panel.show()
    session.set_model(model)
    session.set_data(data)
    session.set_inventory(build_inventory(model))
    session.set_evaluation(evaluate(model.module, data))
    session.set_pruned(result)
    panel.budget.setValue(0.2)
    panel.predicted = predicted  # type: ignore[attr-defined]
    panel.anchors = anchors  # type: ignore[attr-defined]
    yield panel
    runner.shutdown(timeout=60)


def test_measures_estimates_and_plots_every_variant(qtbot, panel: LatencyPanel, tmp_path) -> None:
    assert [v.name for v in panel.variants] == ["original", "pruned 1"]
    with qtbot.waitSignal(panel.runner.finished, timeout=120_000):
        assert panel.measure() is not None
    key = panel.settings_key()
    for v in panel.variants:
        m = v.measured[key]
        assert m.label == "measured" and m.p10_ms <= m.median_ms <= m.p90_ms and m.runs >= 1
        assert v.estimated[key] == (1.0 if v.plan is None else 0.5)
    assert len(panel.predicted) == 2  # type: ignore[attr-defined]
    assert panel.anchors == [panel.variants[0].measured[key].quiet_ms]  # type: ignore[attr-defined]
    column = {name: i for i, name in enumerate(COLUMNS)}
    assert panel.table.item(1, column["Est. ms"]).text() == "0.500"
    quiet = panel.variants[1].measured[key].quiet_ms
    assert panel.table.item(1, column["Quiet ms"]).text() == f"{quiet:.3f}"
    assert panel.table.item(1, column["Est. error"]).text() == f"{0.5 / quiet - 1:+.1%}"
    assert "×" in panel.table.item(1, 4).text()  # speed-up against the original
    assert len(panel.pareto.labels) == 2 and panel.pareto.front  # both have quality and latency
    panel.x_axis.setCurrentIndex(1)
    assert panel.pareto.getAxis("bottom").labelText == "MACs (millions)"
    lines = panel.save_csv(tmp_path / "latency.csv").read_text().splitlines()
    assert lines[0].startswith("variant,params,macs,quality,measured_median_ms")
    assert len(lines) == 3 and lines[2].startswith("pruned 1,")
    assert panel.save_png(Path(tmp_path / "latency.png")).stat().st_size > 5_000
    panel.batch.setValue(4)  # other settings: nothing measured for them yet
    assert panel.table.item(0, 4).text() == ""


def test_per_layer_profile_of_the_selected_variant(qtbot, panel: LatencyPanel) -> None:
    panel.table.selectRow(1)
    with qtbot.waitSignal(panel.runner.finished, timeout=120_000):
        assert panel.profile() is not None
    layers = panel.variants[1].layers[panel.settings_key()]
    assert layers and layers[0].ms >= layers[-1].ms  # slowest first
    names = {n for n, _ in panel.variants[1].model.module.named_modules()}
    assert any(layer.name in names for layer in layers)
    assert panel.bars.full_title == "Measured per-layer time of pruned 1"


def test_fine_tuned_variant_is_added_and_a_new_model_clears(panel: LatencyPanel, demo) -> None:
    result = demo[2]
    tuned = SimpleNamespace(
        model=result.model, accuracy_after=0.99, agreement_after=None, params=result.params_after
    )
    panel.session.set_finetuned(tuned)
    assert [v.name for v in panel.variants][-1] == "pruned 1 fine-tuned"
    assert panel.variants[-1].plan is result.plan and panel.variants[-1].quality == 0.99
    panel.session.set_model(load_model("zoo:resnet20"))
    assert [v.name for v in panel.variants] == ["original"]


def test_target_device_roofline_estimates(panel: LatencyPanel) -> None:
    names = [panel.target.itemData(i) for i in range(panel.target.count())]
    assert "rpi4-cortex-a72" in names and len(names) >= 5  # "none" and the bundled profiles
    panel.target.setCurrentIndex(names.index("rpi4-cortex-a72"))
    column = {name: i for i, name in enumerate(COLUMNS)}
    device, energy = column["Device ms"], column["Energy mJ"]
    original, pruned = (float(panel.table.item(i, device).text()) for i in range(2))
    assert 0 < pruned < original  # half the channels: less to compute and to move
    assert float(panel.table.item(0, energy).text()) > 0
    assert " of " in panel.table.item(0, column["Memory-bound"]).text()
    assert "raspberrypi.com" in panel.source.text()
    panel.table.selectRow(1)
    panel.redraw()
    assert panel.bars.full_title.startswith("Estimated per-layer time of pruned 1 on rpi4")
    panel.target.setCurrentIndex(0)
    assert panel.table.item(0, COLUMNS.index("Device ms")).text() == ""
