"""studio report and studio view: files, JSON and exit codes."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from argparse import Namespace
from pathlib import Path

import pytest

from studio.cli import main
from studio.cli.view import cmd_view


def test_report_html_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    code = main(["report", "--model", "zoo:resnet20", "--out", str(out), "--no-latency", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["format"] == "html"
    assert summary["bytes"] == out.stat().st_size
    text = out.read_text(encoding="utf-8")
    assert f"{summary['params']:,}" in text
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text, re.IGNORECASE)


@pytest.mark.parametrize(
    "args",
    [
        ["--out", "x.txt"],  # neither .html nor .pdf
        ["--out", "x.html", "--recipe", "no-such-recipe.yaml"],
        ["--out", "x.html", "--history", "no-such.csv"],
    ],
)
def test_report_errors_are_one_line(args: list[str], tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--model", "zoo:resnet20", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("studio: error:") and "\n" not in err


def test_view_serves_until_stopped(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really onnx")
    stop = threading.Event()
    args = Namespace(file=str(model), port=0, no_browser=True, json=True)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(cmd_view(args, stop)))
    thread.start()
    try:
        for _ in range(100):
            line = capsys.readouterr().out
            if line:
                break
            stop.wait(0.05)
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:")
        assert b"<html" in urllib.request.urlopen(url, timeout=10).read().lower()
    finally:
        stop.set()
        thread.join(10)
    assert codes == [0]
    assert main(["view", str(tmp_path / "missing.onnx"), "--no-browser"]) == 1
