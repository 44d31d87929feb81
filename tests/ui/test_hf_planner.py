"""The window on a transformer from a Hugging Face folder: the Planner's per-layer head-group
and MLP sliders, allocation to a parameter target, Apply, text fine-tuning with its perplexity
chart, and export to a folder that loads again. A random-weight 2-layer Llama (grouped-query
attention: 8 query heads in 2 key/value groups) on 32-token sequences of a short text."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.core.models import hf_zoo
from studio.core.models.load import load_model
from studio.core.models.text import load_text_data
from studio.core.plan.transformer import allocate_transformer, removed_groups
from studio.core.prune.engine import prune
from studio.core.train.types import FinetuneSettings
from studio.ui.dialogs.export_dialog import ExportDialog
from studio.ui.panels.planner_hf import TransformerCost, base_plan
from studio.ui.panels.planner_hf_table import DROP
from studio.ui.panels.planner_panel import PlannerPanel
from studio.ui.panels.training_panel import TrainingPanel
from studio.ui.runner import JobRunner
from studio.ui.session import Session
from studio.ui.speed_watch import LMSpeedCheck, SpeedWatch
from studio.ui.widgets.speed_line import SpeedLine

SEQ_LEN = 32
TEXT_CHARS = 4000  # about 60 calibration and 7 validation sequences of 32 tokens
JOB_MS = 180_000


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(model, calibration, validation) of a tiny Llama folder and a short text."""
    root = tmp_path_factory.mktemp("hf")
    folder = hf_zoo.write_folder("llama", root / "llama", layers=2)
    text = root / "text.txt"
    text.write_text(hf_zoo.corpus_text()[:TEXT_CHARS])
    model = load_model(str(folder), input_shape=(1, SEQ_LEN))
    splits = load_text_data(text, model.tokenizer, SEQ_LEN, use_cache=False)
    return model, splits.calibration, splits.validation


@pytest.fixture
def session(lm):  # type: ignore[no-untyped-def]
    model, calibration, validation = lm
    s = Session()
    s.set_model(model)
    s.set_data(validation, calibration, "text.txt")
    return s


@pytest.fixture
def planner(qtbot, lm):  # type: ignore[no-untyped-def]
    model, calibration, validation = lm
    session, runner = Session(), JobRunner()
    panel = PlannerPanel(session, runner)
    qtbot.addWidget(panel)
    panel.resize(1100, 600)
    panel.show()
    session.set_model(model)
    session.set_data(validation, calibration, "text.txt")
    qtbot.waitUntil(lambda: isinstance(panel.state.cost, TransformerCost), timeout=JOB_MS)
    yield panel
    runner.shutdown(timeout=60)


def _summary_params(panel: PlannerPanel) -> int:
    """The parameters after, as the summary strip shows them."""
    text = panel.summary.text()
    after = text.split("→", 1)[1].split("(", 1)[0]
    return int(after.replace(",", "").strip())


def test_sliders_per_layer_move_whole_head_groups(qtbot, planner: PlannerPanel) -> None:
    cost, table, state = planner.state.cost, planner.hf_table, planner.state
    assert isinstance(cost, TransformerCost) and len(cost.rows) == 2
    assert table.rowCount() == 2 and len(table.sliders) == 4  # heads and MLP per layer
    assert planner.tables.currentWidget() is table and not planner.cap.isVisible()
    first = cost.rows[0]
    heads = table.heads[first.units.attention]
    assert heads.label.text() == "8/8 heads (kv 2/2)"
    qtbot.waitUntil(lambda: _summary_params(planner) == cost.params_before, timeout=10_000)
    heads.setValue(1)  # keyboard or click: one undoable step
    ratio = state.plan.ratio(first.units.attention)
    assert ratio == pytest.approx(0.5) and removed_groups(ratio, 2) == 1
    assert heads.label.text() == "4/8 heads (kv 1/2)"
    assert first.group_params == first.units.group_params  # Llama: no biases
    expected = cost.params_before - first.units.group_params
    qtbot.waitUntil(lambda: _summary_params(planner) == expected, timeout=10_000)
    assert "Heads</b> 12/16" in planner.summary.text()
    mlp = table.mlps[first.units.mlp]
    mlp.setValue(mlp.value() - 2)  # two steps of 8 neurons
    assert state.plan.ratio(first.units.mlp) == pytest.approx(16 / 192)
    expected -= 16 * first.units.neuron_params
    qtbot.waitUntil(lambda: _summary_params(planner) == expected, timeout=10_000)
    planner.undo_button.click()
    planner.undo_button.click()
    assert not state.plan.active() and heads.value() == 2


def test_uniform_allocation_meets_the_parameter_target(qtbot, planner: PlannerPanel) -> None:
    planner.strategy.setCurrentText("uniform")
    planner.keep.setValue(80.0)
    with qtbot.waitSignal(planner.runner.finished, timeout=JOB_MS):
        planner.allocate_button.click()
    cost, plan = planner.state.cost, planner.state.plan
    assert plan.active() and planner.last_allocation.target["allocate"] == "uniform"
    kept = cost.predict(plan.active())[0]
    assert kept <= 0.8 * cost.params_before
    for row in cost.rows:  # whole head groups
        assert plan.ratio(row.units.attention) * row.units.groups == pytest.approx(
            round(plan.ratio(row.units.attention) * row.units.groups)
        )
    qtbot.waitUntil(lambda: _summary_params(planner) == kept, timeout=10_000)
    planner.kind.setCurrentText("MACs")  # of one sequence, as the engine counts them
    planner.keep.setValue(70.0)
    with qtbot.waitSignal(planner.runner.finished, timeout=JOB_MS):
        planner.allocate_button.click()
    macs = cost.predict(planner.state.plan.active())[1]
    assert macs <= 0.7 * cost.macs_before and "macs" in planner.last_allocation.target
    latency = planner.kind.model().item(2)  # a transformer's latency target is measured
    assert latency.isEnabled() and latency.text() == "latency (measured)"


def test_a_locked_layer_keeps_its_sliders_through_allocation(qtbot, planner: PlannerPanel) -> None:
    cost, table, state = planner.state.cost, planner.hf_table, planner.state
    first, second = (row.units for row in cost.rows)
    table.mlps[first.mlp].setValue(table.mlps[first.mlp].value() - 4)  # 32 neurons off
    mlp_ratio = state.plan.ratio(first.mlp)
    assert mlp_ratio > 0
    table.locks[cost.rows[0].name].setChecked(True)
    assert {first.attention, first.mlp} <= set(state.plan.locked)
    planner.strategy.setCurrentText("uniform")
    planner.keep.setValue(75.0)
    with qtbot.waitSignal(planner.runner.finished, timeout=JOB_MS):
        planner.allocate_button.click()
    plan = state.plan
    assert plan.ratio(first.attention) == 0.0 and plan.ratio(first.mlp) == mlp_ratio
    assert plan.ratio(second.attention) > 0 and plan.ratio(second.mlp) > 0
    assert cost.predict(plan.active())[0] <= 0.75 * cost.params_before * 1.02
    assert table.locks[cost.rows[0].name].isChecked()
    planner.undo_button.click()  # the allocation
    planner.undo_button.click()  # the lock, both units in one step
    assert not state.plan.locked and not table.locks[cost.rows[0].name].isChecked()


def test_latency_target_prunes_until_the_timed_candidate_meets_it(
    qtbot, planner: PlannerPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search and its wiring, with the clock replaced by one that reads the parameters
    (a decode step that costs 1 µs per parameter): timings on a loaded 2-core machine would
    make the test depend on the machine, not on the code."""
    from types import SimpleNamespace

    from studio.core.latency import lm_target

    timed: list[float] = []

    def fake_compare(original, pruned, **kwargs):  # type: ignore[no-untyped-def]
        def clock(module):  # type: ignore[no-untyped-def]
            ms = sum(p.numel() for p in module.parameters()) / 1000.0
            return SimpleNamespace(decode_ms=ms, prefill_ms=ms)

        timed.append(clock(pruned).decode_ms / clock(original).decode_ms)
        return SimpleNamespace(before=clock(original), after=clock(pruned))

    monkeypatch.setattr(lm_target, "compare_lm_latency", fake_compare)
    lines: list[str] = []
    planner.session.logged.connect(lambda _t, _level, text: lines.append(text))
    planner.strategy.setCurrentText("uniform")
    planner.kind.setCurrentText("latency (measured)")
    planner.keep.setValue(85.0)
    with qtbot.waitSignal(planner.runner.finished, timeout=JOB_MS):
        planner.allocate_button.click()
    target = planner.last_allocation.target
    assert target["latency"] == pytest.approx(0.85) and target["threads"] == 1
    assert target["metric"] == "decode ms/token" and target["measured"] in [
        round(t, 4) for t in timed
    ]
    assert abs(target["measured"] - 0.85) <= 0.05 * 0.85  # within the search's goal
    cost = planner.state.cost
    kept = cost.predict(planner.state.plan.active())[0] / cost.params_before
    assert kept == pytest.approx(target["measured"], abs=1e-3)  # the plan that was timed
    assert any("measured 8" in line and "thread" in line for line in lines), lines
    planner.keep.setValue(5.0)  # below what heads and neurons can reach: a one-line failure
    with qtbot.waitSignal(planner.runner.failed, timeout=JOB_MS) as failed:
        planner.allocate_button.click()
    assert str(failed.args[-1]).startswith("cannot reach 5% of the parameters")


def test_sensitivity_asks_for_the_scan_then_reads_it_from_the_cache(
    qtbot, planner: PlannerPanel
) -> None:
    questions: list = []
    planner.ask.connect(lambda title, text, run: questions.append((title, run)))
    planner.strategy.setCurrentText("sensitivity")
    planner.keep.setValue(85.0)
    with qtbot.waitSignal(planner.runner.finished, timeout=JOB_MS):  # the cache is looked at
        planner.allocate_button.click()
    qtbot.waitUntil(lambda: bool(questions), timeout=10_000)
    assert questions[0][0] == "Run a transformer scan?" and not planner.state.plan.active()
    with qtbot.waitSignal(planner.session.head_scan_changed, timeout=JOB_MS):
        questions[0][1]()  # Yes: scan, then allocate
    qtbot.waitUntil(lambda: bool(planner.state.plan.active()), timeout=JOB_MS)
    cost = planner.state.cost
    assert cost.predict(planner.state.plan.active())[0] <= 0.85 * cost.params_before
    assert planner.state.head_scan() is planner.session.head_scan
    qtbot.waitUntil(lambda: "Predicted perplexity" in planner.summary.text(), timeout=10_000)
    drops = [planner.hf_table.item(r, DROP).text() for r in range(planner.hf_table.rowCount())]
    assert any(d.endswith("ppl") for d in drops)
    planner.session.set_head_scan(None)  # the next allocation loads the cached scan unasked
    planner.clear_button.click()
    with qtbot.waitSignal(planner.session.head_scan_changed, timeout=JOB_MS):
        planner.allocate_button.click()
    qtbot.waitUntil(lambda: bool(planner.state.plan.active()), timeout=JOB_MS)
    assert len(questions) == 1 and planner.session.head_scan.cached


def test_apply_prunes_to_the_summary_and_recipes_round_trip(
    qtbot, planner: PlannerPanel, tmp_path: Path
) -> None:
    cost, table = planner.state.cost, planner.hf_table
    table.heads[cost.rows[1].units.attention].setValue(1)
    table.mlps[cost.rows[0].units.mlp].setValue(12)  # 96 of 192 neurons
    expected, macs = cost.predict(planner.state.plan.active())
    recipe = planner.save_recipe(tmp_path / "lm.yaml")
    with qtbot.waitSignal(planner.session.pruned_changed, timeout=JOB_MS):
        planner.apply_button.click()
    result = planner.session.pruned
    assert result.params_after == expected and result.macs_after == macs
    assert sum(p.numel() for p in result.module.parameters()) == expected
    assert result.quality_after.perplexity is not None
    assert "perplexity" in planner.result_line.text() and planner.result_line.isVisible()
    planner.clear_button.click()
    planner.load_recipe(recipe)
    assert cost.predict(planner.state.plan.active())[0] == expected


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_the_summary_counts_biases_as_the_engine_does(family: str, tmp_path: Path) -> None:
    """GPT-2 (fused q|k|v with biases, MLP biases) and Qwen2 (q/k/v biases): a head group and
    a neuron own their biases too, so the Planner's count is what pruning leaves."""
    model = load_model(str(hf_zoo.write_folder(family, tmp_path / family, layers=1)))
    cost = TransformerCost.build(model)
    row = cost.rows[0]
    assert row.group_params > row.units.group_params
    plan = base_plan(model, False).with_ratios({row.units.attention: 0.5, row.units.mlp: 0.25})
    params, macs = cost.predict(plan.active())
    result = prune(model, plan)
    assert (result.params_after, result.macs_after) == (params, macs)


@pytest.fixture(scope="module")
def pruned(lm):  # type: ignore[no-untyped-def]
    """The model pruned to about 80 % of its parameters (chosen on a few sequences)."""
    model, _, validation = lm
    plan = allocate_transformer(model, 0.8, "uniform", base=base_plan(model, True))
    return prune(model, plan, validation.subset(4))


def test_text_finetune_charts_perplexity_and_saves_a_folder(
    qtbot, lm, pruned, tmp_path: Path
) -> None:
    model, calibration, validation = lm
    session, runner = Session(), JobRunner()
    panel = TrainingPanel(session, runner)
    qtbot.addWidget(panel)
    session.set_model(model)
    session.set_data(validation, calibration, "text.txt")
    session.set_pruned(pruned)
    form, text = panel.form, FinetuneSettings.for_text()
    assert form.text and form.optimizer.currentData() == text.optimizer == "adamw"
    assert form.lr.value() == pytest.approx(text.learning_rate)
    assert form.batch_size.value() == text.batch_size
    assert form.temperature.value() == pytest.approx(text.distill_temperature)
    assert form.distilling and form.settings().augment == "none"
    assert f"trains on the {len(calibration)} sequences of text.txt (calib" in panel.subject.text()
    form.epochs.setValue(1)
    try:
        with qtbot.waitSignal(session.finetuned_changed, timeout=JOB_MS):
            panel.start_button.click()
        epochs = [r for r in panel.history if r.kind == "epoch"]
        assert len(epochs) == 1 and epochs[0].perplexity is not None
        panel.charts.redraw()
        quality = panel.charts.series["quality"]
        assert epochs[0].perplexity in list(quality.y)  # after the starting point
        assert quality.x[-1] == epochs[0].step
        assert "perplexity" in panel.charts.quality_plot.titleLabel.text
        assert "perplexity" in panel.status.text()
        header = panel.save_csv(tmp_path / "history.csv").read_text().splitlines()[0]
        assert "perplexity" in header.split(",")
        assert panel.save_png(tmp_path / "charts.png").stat().st_size > 0
        with qtbot.waitSignal(runner.finished, timeout=JOB_MS):
            panel.save_transformer(tmp_path / "tuned")
        tuned = session.finetuned.model
        again = load_model(str(tmp_path / "tuned"), input_shape=(1, SEQ_LEN))
        assert sum(p.numel() for p in again.module.parameters()) == pruned.params_after
        assert again.fingerprint() == tuned.fingerprint()
    finally:
        runner.shutdown(timeout=60)


def test_export_offers_a_folder_first_that_loads_back(qtbot, lm, pruned, tmp_path: Path) -> None:
    model, calibration, validation = lm
    session, runner = Session(), JobRunner()
    session.set_model(model)
    session.set_data(validation, calibration, "text.txt")
    session.set_pruned(pruned)
    dialog = ExportDialog(session, runner, str(tmp_path))
    qtbot.addWidget(dialog)
    formats = [dialog.format_combo.itemData(i) for i in range(dialog.format_combo.count())]
    assert dialog.chosen_model() is pruned.model and formats == ["huggingface", "onnx"]
    assert Path(dialog.path.text()).suffix == "" and not dialog.int8.isEnabled()
    dialog.path.setText(str(tmp_path / "pruned-lm"))
    try:
        with qtbot.waitSignal(runner.finished, timeout=JOB_MS):
            dialog.export_button.click()
        result = dialog.last_result
        assert result.params == result.params_model == pruned.params_after
        assert "Hugging Face folder" in dialog.result_view.toHtml()
        again = load_model(str(tmp_path / "pruned-lm"), input_shape=(1, SEQ_LEN))
        assert sum(p.numel() for p in again.module.parameters()) == pruned.params_after
        dialog.format_combo.setCurrentIndex(1)  # ONNX, input_ids in, at the text exporter's opset
        assert dialog.path.text().endswith("pruned-lm.onnx") and dialog.opset.value() == 18
        with qtbot.waitSignal(runner.finished, timeout=JOB_MS):
            dialog.export_button.click()
        onnx = dialog.last_result
        assert onnx.format == "onnx" and onnx.input_names == ("input_ids",)
        assert onnx.path.is_file() and onnx.max_abs_diff <= 1e-4 * max(1.0, onnx.output_scale)
    finally:
        runner.shutdown(timeout=60)


def test_a_pruned_language_model_is_timed_as_prefill_and_decode(qtbot, lm, pruned) -> None:
    model, calibration, validation = lm
    session, runner = Session(), JobRunner()
    watch = SpeedWatch(session, runner)
    session.set_model(model)
    session.set_data(validation, calibration, "text.txt")
    try:
        with qtbot.waitSignal(watch.checked, timeout=JOB_MS, check_params_cb=lambda k, c: c):
            session.set_pruned(pruned)
    finally:
        runner.shutdown(timeout=60)
    check = watch.results["pruned"]
    assert isinstance(check, LMSpeedCheck) and check.comparison.after.decode_ms is not None
    line = SpeedLine()
    qtbot.addWidget(line)
    line.show_check(check)  # as the Result and Training tabs show it
    assert "prefill" in line.label.text() and "decode" in line.label.text()
    assert line.fix_button.isHidden()  # no channel fix for a transformer
