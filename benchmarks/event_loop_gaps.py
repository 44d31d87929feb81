"""How well the window keeps serving events while jobs run: jobs in their own processes (the
default) against jobs on a thread of the window's process (``STUDIO_IN_PROCESS=1``), side by
side in one run.

Each mode runs in a fresh process with an offscreen main window on the demo model and data:
a sensitivity scan (the default settings, cache off), then a fine-tune of the demo pruned to half
its channels (uniform 0.5, the default settings otherwise). A 10 ms probe timer runs on the
event loop throughout; the script prints, per job, the largest gap between ticks and how many
exceeded 50 ms, the time from Start to the first progress report, and the job's wall time (the
fine-tune's per step, with the seconds per step its records measure inside the job).

    .venv/bin/python benchmarks/event_loop_gaps.py [--epochs 2] [--modes isolated,in-process]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROBE_MS = 10
SLOW_MS = 50


def measure(epochs: int) -> dict[str, dict[str, float]]:
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtCore import QEventLoop, Qt, QTimer

    from studio.core.models.data import demo_splits
    from studio.core.plan.plan import PruningPlan
    from studio.core.prune.engine import prune, prune_targets
    from studio.ui.app import application
    from studio.ui.main_window import MainWindow

    app = application()
    window = MainWindow(interactive=False)
    window.show()
    ticks: list[float] = []
    probe = QTimer()
    probe.setTimerType(Qt.TimerType.PreciseTimer)
    probe.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def wait_idle() -> None:
        while window.runner.is_busy():
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.005)

    window.open_model("demo")
    window.open_data("demo")
    wait_idle()
    deadline = time.monotonic() + 60
    while window.session.evaluation is None and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.01)
        wait_idle()

    def run(start) -> dict[str, float]:  # type: ignore[no-untyped-def]
        first: list[float] = []
        window.runner.progress.connect(lambda *a: first.append(time.perf_counter()))
        ticks.clear()
        probe.start(PROBE_MS)
        loop = QEventLoop()  # the window's own loop: it sleeps between events, as in the app
        signals = (window.runner.finished, window.runner.failed, window.runner.cancelled)
        started: list = []

        def ended_one(job, *_args) -> None:  # type: ignore[no-untyped-def]
            if started and job is started[0]:  # other jobs the window starts may end first
                loop.quit()

        for signal in signals:
            signal.connect(ended_one)
        began = time.perf_counter()
        job = start()
        started.append(job)
        if not job.done:
            loop.exec()
        ended = time.perf_counter()
        for signal in signals:
            signal.disconnect(ended_one)
        probe.stop()
        window.runner.progress.disconnect()
        gaps = [(b - a) * 1000 for a, b in zip(ticks, ticks[1:])]
        return {
            "state": job.state,
            "wall_s": ended - began,
            "first_progress_ms": (first[0] - began) * 1000 if first else float("nan"),
            "max_gap_ms": max(gaps) if gaps else float("nan"),
            "gaps_over_50ms": sum(g > SLOW_MS for g in gaps),
            "ticks": len(ticks),
        }

    window.sensitivity.controls.use_cache.setChecked(False)
    scan = run(window.sensitivity.start)
    model = window.session.model
    assert model is not None
    names = prune_targets(model, "structured")
    plan = PruningPlan("structured", ratios=dict.fromkeys(names, 0.5))
    window.session.set_pruned(prune(model, plan, calibration=demo_splits()[0]))
    wait_idle()  # the jobs a new pruned model starts (channel norms...) end before measuring
    window.training.form.epochs.setValue(epochs)
    tune = run(window.training.start)
    steps = [r for r in window.training.history if r.kind == "step"]
    total_steps = steps[-1].step if steps else 0
    tune["steps"] = total_steps
    tune["wall_s_per_step"] = tune["wall_s"] / max(1, total_steps)
    inside = [r.samples_per_s for r in steps if r.samples_per_s]
    batch = window.training.form.batch_size.value()
    tune["train_s_per_step"] = batch / (sum(inside) / len(inside)) if inside else float("nan")
    window.close()
    return {"scan": scan, "fine-tune": tune}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--modes", default="isolated,in-process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.epochs)), flush=True)
        return
    results = {}
    for mode in args.modes.split(","):
        env = {**os.environ, "STUDIO_CACHE_DIR": tempfile.mkdtemp(prefix="studio-gaps-")}
        env.pop("STUDIO_IN_PROCESS", None)
        if mode == "in-process":
            env["STUDIO_IN_PROCESS"] = "1"
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--epochs", str(args.epochs)],
            env=env,
            capture_output=True,
            text=True,
        )
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(line[0][7:])
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; probe every {PROBE_MS} ms")
    head = f"{'mode':<11} {'job':<9} {'state':<9} {'max gap':>9} {'>50 ms':>7} "
    print(head + f"{'1st progress':>13} {'wall':>8} {'s/step':>8} {'in-job s/step':>14}")
    for mode, jobs in results.items():
        for name, r in jobs.items():
            per_step = f"{r['wall_s_per_step']:.4f}" if "wall_s_per_step" in r else ""
            inside = f"{r['train_s_per_step']:.4f}" if "train_s_per_step" in r else ""
            print(
                f"{mode:<11} {name:<9} {r['state']:<9} {r['max_gap_ms']:>7.1f}ms "
                f"{r['gaps_over_50ms']:>7} {r['first_progress_ms']:>11.0f}ms "
                f"{r['wall_s']:>7.1f}s {per_step:>8} {inside:>14}"
            )
    if {"isolated", "in-process"} <= results.keys():
        a, b = results["isolated"], results["in-process"]
        for name in a:
            print(
                f"{name}: max gap isolated/in-process {a[name]['max_gap_ms']:.1f}/"
                f"{b[name]['max_gap_ms']:.1f} ms; wall time ratio "
                f"{a[name]['wall_s'] / b[name]['wall_s']:.2f}"
            )
        step_a, step_b = a["fine-tune"]["wall_s_per_step"], b["fine-tune"]["wall_s_per_step"]
        print(f"fine-tune overhead per step: {1000 * (step_a - step_b):+.1f} ms")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                flags = open("/proc/cpuinfo").read()
                isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
                return f"{line.split(':', 1)[1].strip()} ({isa})"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
