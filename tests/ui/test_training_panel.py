"""The Training tab: fine-tuning the pruned model with live charts, pause, cancel and
continue from the checkpoint, and the result in the session and the Result tab."""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.core.models.data import demo_splits
from studio.core.models.evaluate import evaluate
from studio.core.models.load import load_model
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets
from studio.core.train.types import FinetuneResult
from studio.ui.panels.compare_panel import ComparePanel
from studio.ui.panels.training_panel import TrainingPanel
from studio.ui.panels.training_run import training_split
from studio.ui.runner import JobRunner
from studio.ui.session import Session


@pytest.fixture(scope="module")
def pruned():  # type: ignore[no-untyped-def]
    model = load_model("demo")
    data = demo_splits()[1].subset(96)
    names = prune_targets(model, "structured")
    result = prune(
        model, PruningPlan("structured", ratios={n: 0.5 for n in names}, recalibrate_bn=False), data
    )
    return model, data, result


@pytest.fixture
def panel(qtbot, pruned, tmp_path: Path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    model, data, result = pruned
    session, runner = Session(), JobRunner()
    panel = TrainingPanel(session, runner)
    compare = ComparePanel(session)
    qtbot.addWidget(panel)
    qtbot.addWidget(compare)
    panel.compare = compare  # type: ignore[attr-defined]
    panel.resize(1200, 700)
    panel.show()
    session.set_model(model)
    session.set_data(data)
    session.set_evaluation(evaluate(model.module, data))
    session.set_pruned(result)
    panel.form.epochs.setValue(2)
    panel.form.batch_size.setValue(16)
    yield panel
    runner.shutdown(timeout=60)


def test_split_keeps_demo_validation_and_holds_out_otherwise(pruned) -> None:
    train, val, text = training_split(demo_splits()[1])
    assert len(train) == 1437 and len(val) == 360 and "digits (train)" in text
    train, val, text = training_split(pruned[1])
    assert (len(train), len(val)) == (77, 19) and "20 %" in text


def test_fine_tunes_the_pruned_model_with_live_charts(qtbot, panel: TrainingPanel) -> None:
    session = panel.session
    assert panel.form.distilling and panel.start_button.isEnabled()
    with qtbot.waitSignal(session.finetuned_changed, timeout=120_000):
        assert panel.start() is not None
    result = session.finetuned
    assert isinstance(result, FinetuneResult)
    assert result.epochs_run == 2 and 1 <= result.best_epoch <= 2
    assert result.params == session.pruned.params_after  # the pruned architecture, trained
    epochs = [r for r in panel.history if r.kind == "epoch"]
    assert len(epochs) == 2
    panel.charts.redraw()
    series = panel.charts.series
    assert series["loss"].size == sum(1 for r in panel.history if r.kind == "step") > 2
    assert series["quality"].size == 3  # before training, and after each epoch
    assert series["quality"].y[0] == pytest.approx(100 * result.accuracy_before)
    assert panel.charts.reference_line.isVisible()  # the unpruned model's accuracy
    assert panel.charts.best is not None and panel.charts.best[2] == result.best_epoch
    assert "best epoch" in panel.status.text()
    assert "fine-tuned" in panel.compare.header.text()  # type: ignore[attr-defined]


def test_saves_history_charts_and_model(qtbot, panel: TrainingPanel, tmp_path: Path) -> None:
    with qtbot.waitSignal(panel.session.finetuned_changed, timeout=120_000):
        panel.start()
    csv = panel.save_csv(tmp_path / "history.csv").read_text().splitlines()
    assert csv[0].startswith("kind,step,epoch,loss") and len(csv) == len(panel.history) + 1
    assert panel.save_png(tmp_path / "charts.png").stat().st_size > 10_000
    saved = panel.save_model(tmp_path / "tuned.pt")
    again = load_model(str(saved))
    tuned = panel.session.finetuned.model.module  # type: ignore[union-attr]
    assert sum(p.numel() for p in again.module.parameters()) == sum(
        p.numel() for p in tuned.parameters()
    )


def test_pause_cancel_then_continue_from_the_checkpoint(qtbot, panel: TrainingPanel) -> None:
    panel.form.epochs.setValue(3)
    job = panel.start()
    assert job is not None
    qtbot.waitUntil(lambda: any(r.kind == "epoch" for r in panel.history), timeout=120_000)
    panel.toggle_pause()
    assert panel.pause_token.paused and panel.pause_button.text() == "Resume"
    seen = len(panel.history)
    # the job runs in its own process: the records it made before the pause reached it (the
    # step that was running, and those still on their way here) may land after the toggle
    qtbot.wait(400)
    settled = len(panel.history)
    assert settled <= seen + 3
    qtbot.wait(600)
    assert len(panel.history) == settled  # paused: nothing more
    with qtbot.waitSignal(panel.runner.cancelled, timeout=30_000):
        panel.cancel()
    assert job.state == "cancelled" and panel.session.finetuned is None
    assert "Start continues" in panel.status.text()
    with qtbot.waitSignal(panel.session.finetuned_changed, timeout=120_000):
        panel.start()
    result = panel.session.finetuned
    assert result is not None and result.resumed_from >= 1 and result.epochs_run == 3
    epochs = [r.epoch for r in panel.history if r.kind == "epoch"]
    assert epochs == [1.0, 2.0, 3.0]  # the first epoch came from the checkpoint, not again


def test_fine_tunes_on_ray_when_the_compute_setting_says_so(qtbot, panel: TrainingPanel) -> None:
    pytest.importorskip("ray")
    from studio.core.cluster.connection import Cluster, Compute

    session = panel.session
    session.set_compute(Compute("local", 2))
    assert panel.where.text().startswith("Runs on Ray: local, 2 workers")
    panel.form.epochs.setValue(1)
    try:
        with qtbot.waitSignal(session.finetuned_changed, timeout=240_000):
            assert panel.start() is not None
        result = session.finetuned
        assert isinstance(result, FinetuneResult) and result.epochs_run == 1
        assert result.params == session.pruned.params_after
        assert panel.where.text().startswith("Runs on local Ray at 127.0.0.1:")
        assert "2 training workers" in panel.where.text()
        steps = [r for r in panel.history if r.kind == "step"]
        assert len(steps) >= 2  # the charts were fed while it ran
    finally:
        Cluster.shutdown()
