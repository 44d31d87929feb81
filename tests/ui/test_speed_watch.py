"""The speed check after Apply and fine-tuning: measured side by side in the background, shown
in one line under the result, logged, and fixed in one click (re-plan with runtime channels)."""

from __future__ import annotations

from torch import nn

from studio.core.latency.speed_check import SpeedCheck
from studio.core.plan.plan import PruningPlan
from studio.core.prune.engine import prune, prune_targets
from studio.ui.main_window import MainWindow
from studio.ui.widgets.speed_line import SpeedLine


def test_speed_line_shows_the_check_and_offers_the_fix_only_when_it_helps(qtbot) -> None:
    line = SpeedLine()
    qtbot.addWidget(line)
    assert line.isHidden()  # until there is something to say
    line.show_pending("pruned")
    assert "Timing the pruned model" in line.label.text() and line.fix_button.isHidden()
    slow = SpeedCheck("onnxruntime", 1, 2, 1.0, 1.2, 8, [("layers.3.conv1", 23)], 0.5)
    line.show_check(slow)
    assert "not faster: 0.83x" in line.label.text() and not line.fix_button.isHidden()
    bound = SpeedCheck("onnxruntime", 1, 2, 1.0, 1.2, 8, [], 0.5)
    line.show_check(bound)
    assert line.fix_button.isHidden()  # no layer left the fast path: re-planning would not help
    line.show_check(SpeedCheck("onnxruntime", 1, 2, 1.0, 0.5, 8))
    assert "2.00x faster" in line.label.text() and line.fix_button.isHidden()
    fixes = []
    line.fix.connect(lambda: fixes.append(1))
    line.fix_button.click()
    assert fixes == [1]
    line.show_check(None)
    assert line.isHidden()


def test_apply_is_timed_against_the_original_and_the_fix_replans_aligned(
    qtbot, window: MainWindow, wait_idle
) -> None:
    window.open_model("demo")
    window.open_data("demo")
    wait_idle(window)
    qtbot.waitUntil(lambda: window.planner.state.cost is not None, timeout=60_000)
    session = window.session
    names = prune_targets(session.model, "structured")
    plan = PruningPlan("structured", ratios=dict.fromkeys(names, 0.3), recalibrate_bn=False)
    with qtbot.waitSignal(window.speed_watch.checked, timeout=120_000) as checked:
        session.set_pruned(prune(session.model, plan))
    while checked.args[1] is None:  # the stale ones are cleared first
        with qtbot.waitSignal(window.speed_watch.checked, timeout=120_000) as checked:
            pass
    kind, check = checked.args
    assert kind == "pruned" and isinstance(check, SpeedCheck)
    assert check.original_ms > 0 and check.variant_ms > 0
    assert window.result.speed.check is check and check.line() in window.result.speed.label.text()
    assert any(f"Speed check, pruned: {check.line()}" in x for x in window.log_panel.lines())
    # the fix: runtime channels, the plan's target allocated again, applied
    window.planner.kind.setCurrentText("MACs")
    window.planner.keep.setValue(60.0)
    window.planner.strategy.setCurrentText("uniform")
    window.planner.round_to.setCurrentText("exact")
    with qtbot.waitSignal(session.pruned_changed, timeout=120_000):
        window.result.speed.fix.emit()
    assert window.planner.round_to.currentIndex() == 0
    multiple = int(window.planner.round_to.currentData())
    for name, mod in session.pruned.module.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.out_channels >= multiple:
            assert mod.out_channels % multiple == 0, (name, mod.out_channels)
    wait_idle(window)
    assert "pruned" in window.speed_watch.results
