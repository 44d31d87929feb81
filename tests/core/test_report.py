"""The report is one self-contained HTML file with the key numbers; netron is served locally."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from studio.core.export.netron_server import HOST, NetronServer
from studio.core.export.report import (
    ReportData,
    history_from_csv,
    layer_shapes,
    render_html,
    write_report,
)
from studio.core.plan.plan import PruningPlan
from studio.core.scan.types import ScanReport, ScanRow, ScanSettings, ScanTarget
from studio.core.train.types import TrainRecord, history_csv

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def tiny_scan() -> ScanReport:
    settings = ScanSettings(metric="loss", method="taylor", ratios=(0.25, 0.5))
    targets = [ScanTarget("conv1", ("conv1",), 8, 80), ScanTarget("conv2", ("conv2",), 8, 80)]
    row = lambda layer, ratio, loss: ScanRow(layer, ratio, None, loss, 1.0, 0.0)  # noqa: E731
    rows = [row("conv1", 0.25, 0.5), row("conv1", 0.5, 0.9), row("conv2", 0.25, 0.3)]
    return ScanReport(settings, targets, row("", 0.0, 0.25), rows)


def history() -> list[TrainRecord]:
    out = [TrainRecord("step", i, i / 4, 1.0 / i, 0.01, 0.5, 10.0) for i in range(1, 9)]
    out.append(TrainRecord("epoch", 8, 2.0, 0.1, 0.01, 0.5, 10.0, 0.9731, 0.2, 0.98, True))
    return out


def test_html_is_self_contained_with_the_key_numbers(tmp_path: Path) -> None:
    original = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    pruned = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Conv2d(5, 8, 3))
    data = ReportData(
        title="Pruning report: tiny",
        model_name="tiny (pruned)",
        summary=[("Parameters", "812", "503")],
        plan=PruningPlan(ratios={"0": 0.375}, criterion="l1"),
        scan=tiny_scan(),
        shapes=layer_shapes(original, pruned),
        history=history(),
        measured_ms={"tiny on this CPU": 0.123},
        estimated_ms={"tiny on a Jetson": 4.567},
    )
    text = render_html(data)
    assert not EXTERNAL.search(text)
    assert "<script" not in text.lower()
    for number in ("503", "37.5%", "5×3×3×3", "0.123", "4.567", "97.31%", "l1"):
        assert number in text, number
    assert text.count('src="data:image/png;base64,') == 3  # heatmap, loss, validation
    path = write_report(text, tmp_path / "r.html")
    assert path.read_text(encoding="utf-8") == text
    with pytest.raises(Exception, match="input file"):
        write_report(text, tmp_path / "r.html", protected=(tmp_path / "r.html",))


def test_history_csv_round_trip() -> None:
    records = history()
    assert history_from_csv(history_csv(records)) == records


def test_netron_server_local_only_and_stops(tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"first model")
    b.write_bytes(b"second model")
    with NetronServer(a) as one, NetronServer(b) as two:
        assert one.address[0] == HOST == "127.0.0.1" and one.address[1] != two.address[1]
        with urllib.request.urlopen(one.url, timeout=10) as reply:
            page = reply.read().decode()
            assert "consent=" in reply.headers["Set-Cookie"]  # no banner, no ipinfo lookup
        assert '<meta name="version" content="0.0.0">' in page  # unpackaged: no analytics
        assert 'name="date"' not in page and "/data/a.onnx" in page
        assert urllib.request.urlopen(one.url + "index.js", timeout=10).status == 200
        assert urllib.request.urlopen(one.url + "data/a.onnx").read() == b"first model"
        assert urllib.request.urlopen(two.url + "data/b.onnx").read() == b"second model"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(one.url + "../server.py", timeout=10)
    assert not one.running
    with pytest.raises(OSError):
        urllib.request.urlopen(one.url, timeout=2)
