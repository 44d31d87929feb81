"""Issue 16: no job can take the window down. A fine-tuning job crashes on purpose in native
code (a null dereference after its first epoch); the window survives, a dialog and a log line
name the job, everything the session held is still there (the model, the data, the pruned
model, the run's checkpoint), and the next job continues the run from that checkpoint."""

from __future__ import annotations

import ctypes

from studio.core.models.data import demo_splits
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets
from studio.core.train.checkpoint import LAST
from studio.core.train.types import TrainRecord
from studio.ui.main_window import MainWindow
from studio.ui.panels import training_panel


def test_a_native_crash_in_fine_tuning_leaves_the_window_and_the_session(
    qtbot, window: MainWindow, wait_idle, dialogs, monkeypatch
) -> None:
    window.open_model("demo")
    window.open_data("demo")
    wait_idle(window)
    qtbot.waitUntil(lambda: window.session.evaluation is not None, timeout=60_000)
    session = window.session
    model, data = session.model, session.data
    names = prune_targets(model, "structured")
    plan = PruningPlan("structured", ratios=dict.fromkeys(names, 0.5), recalibrate_bn=False)
    session.set_pruned(prune(model, plan, calibration=demo_splits()[0].subset(256)))
    pruned = session.pruned

    real_stream = training_panel.training_stream

    def crashing_stream(*args, **kwargs):  # type: ignore[no-untyped-def]
        for item in real_stream(*args, **kwargs):
            yield item
            if isinstance(item, TrainRecord) and item.kind == "epoch":
                ctypes.string_at(0)  # SIGSEGV in the job's process, as oneDNN's was

    monkeypatch.setattr(training_panel, "training_stream", crashing_stream)
    panel = window.training
    panel.form.epochs.setValue(2)
    with qtbot.waitSignal(window.runner.failed, timeout=180_000) as failed:
        assert panel.start() is not None
    message = failed.args[1]
    assert message.startswith("Fine-tuning crashed in native code (SIGSEGV) during 'epoch 1.00'")
    qtbot.waitUntil(lambda: bool(dialogs["critical"]), timeout=5000)
    assert dialogs["critical"] == [("Fine-tuning failed", message)]
    assert any(
        "Fine-tuning failed: Fine-tuning crashed" in line for line in window.log_panel.lines()
    )
    # the window and the session are as they were
    assert window.isVisible()
    assert session.model is model and session.data is data and session.pruned is pruned
    assert session.finetuned is None
    assert (panel.checkpoint / LAST).is_file()  # the first epoch's checkpoint
    epochs_seen = [r for r in panel.history if r.kind == "epoch"]
    assert len(epochs_seen) == 1

    # the next job runs, and continues the crashed run from its checkpoint
    monkeypatch.setattr(training_panel, "training_stream", real_stream)
    with qtbot.waitSignal(session.finetuned_changed, timeout=180_000):
        assert panel.start() is not None
    result = session.finetuned
    assert result.resumed_from == 1 and result.epochs_run == 2
    assert result.accuracy_after > 0.9
