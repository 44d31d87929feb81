from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken
from studio.core.models.data import demo_splits
from studio.core.models.load import load_model
from studio.core.paths import cache_dir
from studio.core.scan.sensitivity import SensitivityScan, scan
from studio.core.scan.types import ScanSettings


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


@pytest.fixture(scope="module")
def val64():
    return demo_splits()[1].subset(64)


def _max_diff(a, b) -> float:
    other = {(r.layer, r.ratio): r for r in b.rows}
    assert len(other) == len(a.rows)
    worst = 0.0
    for row in a.rows:
        twin = other[(row.layer, row.ratio)]
        for key in ("accuracy", "loss", "agreement", "kl"):
            x, y = getattr(row, key), getattr(twin, key)
            if x is None or (math.isnan(x) and math.isnan(y)):
                continue
            worst = max(worst, abs(x - y))
    return worst


@pytest.mark.parametrize(
    "mode, ratios", [("structured", (0.3, 0.8)), ("unstructured", (0.5,)), ("nm", (0.5,))]
)
def test_exact_matches_naive(demo, val64, mode, ratios) -> None:
    before = demo.fingerprint()
    naive = scan(
        demo, val64, ScanSettings(mode=mode, method="naive", ratios=ratios), use_cache=False
    )
    for workers in (1, 2):
        job = SensitivityScan(
            demo, val64, ScanSettings(mode=mode, ratios=ratios), use_cache=False, workers=workers
        )
        job.prepare()
        list(job.run())
        assert _max_diff(job.report, naive) <= 1e-6
        assert not any(r.error for r in job.report.rows)
    assert demo.fingerprint() == before  # the loaded model is never changed


def test_exact_matches_naive_on_vit_attention_and_mobilenet(val64) -> None:
    for name in ("vit", "mobilenetv2"):
        model = load_model(f"zoo:{name}")
        settings = dict(mode="structured", metric="loss", ratios=(0.25, 0.5))
        naive = scan(
            model, val64.subset(16), ScanSettings(method="naive", **settings), use_cache=False
        )
        exact = scan(model, val64.subset(16), ScanSettings(**settings), use_cache=False)
        assert _max_diff(exact, naive) <= 1e-6
        assert not any(r.error for r in exact.rows), [r.error for r in exact.rows if r.error]


def test_residual_group_is_one_target_with_a_real_drop(demo, val64) -> None:
    report = scan(demo, val64, ScanSettings(ratios=(0.5,)), use_cache=False)
    by_name = {t.name: t for t in report.targets}
    stage1 = by_name["conv1"]  # the stem and every block's second conv share channels
    assert {"layers.0.conv2", "layers.1.conv2", "layers.2.conv2", "bn1"} <= set(stage1.layers)
    assert not any("layers.0.conv2" == t.name for t in report.targets)
    row = next(r for r in report.rows if r.layer == "conv1")
    assert report.drop(row) > 0.2


def test_nm_mask_keeps_two_of_every_four(demo, val64) -> None:
    job = SensitivityScan(demo, val64, ScanSettings(mode="nm", ratios=(0.5,)), use_cache=False)
    weight = dict(demo.module.named_modules())["layers.0.conv2"].weight
    keep = job._mask(weight, 0.5)
    groups = keep.movedim(1, -1).reshape(-1, 4)
    assert torch.all(groups.sum(1) == 2)
    kept = (weight.abs() * keep).movedim(1, -1).reshape(-1, 4)
    dropped = (weight.abs() * (1 - keep)).movedim(1, -1).reshape(-1, 4)
    assert torch.all(kept.max(1).values >= dropped.max(1).values)


def test_taylor_gives_estimates_and_needs_loss(demo, val64) -> None:
    with pytest.raises(StudioError, match="--metric loss"):
        ScanSettings(method="taylor", metric="accuracy")
    before = [p.grad for p in demo.module.parameters()]
    report = scan(
        demo,
        val64,
        ScanSettings(method="taylor", metric="loss", ratios=(0.2, 0.8)),
        use_cache=False,
    )
    assert all(r.estimate for r in report.rows) and len(report.rows) == 24
    for target in report.targets:  # more pruning, larger estimated loss increase
        low, high = (report.drop(r) for r in report.rows if r.layer == target.name)
        assert high >= low >= 0
    assert [p.grad for p in demo.module.parameters()] == before


def test_cancel_then_resume_without_recomputing(demo, val64) -> None:
    settings = ScanSettings(ratios=(0.2, 0.6), mode="unstructured")
    token = CancelToken()
    first = SensitivityScan(demo, val64, settings, workers=1)
    first.prepare()
    measured = 0
    with pytest.raises(Cancelled):
        for _ in first.run(cancel=token):
            measured += 1
            if measured == 5:
                token.cancel()
    second = SensitivityScan(demo, val64, settings, workers=1)
    report = second.prepare()
    assert report.cached_rows == 5
    remaining = list(second.run())
    assert len(remaining) == len(report.targets) * 2 - 5
    third = SensitivityScan(demo, val64, settings)
    assert third.prepare().cached_rows == len(report.targets) * 2
    assert list(third.run()) == []


def test_killed_scan_resumes_from_the_cache(tmp_path, val64) -> None:
    import numpy as np

    np.savez(tmp_path / "val64.npz", x=val64.x.numpy(), y=val64.y.numpy())
    env = dict(os.environ, STUDIO_CACHE_DIR=str(tmp_path / "cache"))
    data = str(tmp_path / "val64.npz")
    argv = [
        sys.executable,
        "-m",
        "studio",
        "scan",
        "--model",
        "demo",
        "--data",
        data,
        "--mode",
        "unstructured",
        "--ratios",
        "0.5,0.9",
        "--workers",
        "1",
        "--method",
        "naive",
        "--json",
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    folder = tmp_path / "cache" / "sensitivity"
    deadline = time.monotonic() + 120
    rows = 0
    while time.monotonic() < deadline and rows < 3:
        time.sleep(0.2)
        files = list(folder.glob("*.json")) if folder.exists() else []
        if files:
            try:
                rows = files[0].read_text().count('"layer"')
            except OSError:
                rows = 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert rows >= 3
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import json

    summary = json.loads(done.stdout)
    assert 3 <= summary["cached_rows"] < summary["rows"] == 22 * 2  # killed halfway


def test_structured_scan_refused_for_torchscript(tmp_path, val64) -> None:
    model = load_model("zoo:vgg11")
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(model.module, model.example_input(), check_trace=False), path)
    scripted = load_model(str(path), input_shape=(1, 1, 32, 32))
    with pytest.raises(StudioError, match="structural pruning"):
        SensitivityScan(scripted, val64, ScanSettings()).prepare()
    assert cache_dir().exists()
