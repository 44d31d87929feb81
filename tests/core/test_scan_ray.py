"""Sensitivity scans on a local Ray instance: same rows as in-process, live rows, cancel,
lost workers, resume after a kill, loopback-only and token-authenticated local instances."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from studio.core.cluster.connection import Cluster, check_address, check_connection  # noqa: E402
from studio.core.cluster.scan import split_units  # noqa: E402
from studio.core.errors import Cancelled, StudioError  # noqa: E402
from studio.core.jobs import CancelToken  # noqa: E402
from studio.core.models.data import load_data  # noqa: E402
from studio.core.models.load import load_model  # noqa: E402
from studio.core.scan.sensitivity import SensitivityScan  # noqa: E402
from studio.core.scan.types import ScanSettings  # noqa: E402

RATIOS = (0.3, 0.7)


@pytest.fixture(scope="module")
def local_ray():
    info = check_connection("local")
    yield info
    Cluster.shutdown()


@pytest.fixture(scope="module")
def demo():
    return load_model("demo"), load_data("demo").subset(120)


def _settings(method: str = "exact", mode: str = "structured") -> ScanSettings:
    metric = "accuracy"
    ratios = RATIOS if mode != "nm" else (0.5,)
    return ScanSettings(mode, metric, method, ratios, "l2", 64)


def _on_ray(model, data, settings: ScanSettings) -> SensitivityScan:
    return SensitivityScan(model, data, settings, use_cache=False, workers=2, ray_address="local")


def _rows(scan: SensitivityScan) -> dict:
    return {(r.layer, r.ratio): r for r in scan.report.rows}


def _diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key, row in a.items():
        other = b[key]
        for field in ("accuracy", "loss", "agreement", "kl"):
            worst = max(worst, abs(getattr(row, field) - getattr(other, field)))
    return worst


def test_ray_scan_gives_the_in_process_rows(local_ray, demo):
    model, data = demo
    here = SensitivityScan(model, data, _settings(), use_cache=False)
    here.prepare()
    list(here.run())
    on_ray = _on_ray(model, data, _settings())
    on_ray.prepare()
    seen = list(on_ray.run())
    assert len(seen) == len(here.report.rows) == 12 * len(RATIOS)
    assert _diff(_rows(here), _rows(on_ray)) <= 1e-6
    stats = on_ray.ray_stats
    assert stats.workers == 2 and "127.0.0.1" in stats.where
    assert len(stats.units) == 12  # one unit a target, each with every ratio
    assert all(rows == len(RATIOS) for _, rows, _ in stats.units)
    assert stats.object_bytes > 1_000_000  # the demo's weights and the images went once


def test_few_targets_are_split_across_workers(local_ray, demo):
    model, data = demo
    settings = ScanSettings("structured", "accuracy", "exact", (0.1, 0.3, 0.5, 0.7), "l2", 64)
    here = SensitivityScan(model, data, settings, use_cache=False)
    here.prepare()
    list(here.run())
    scan = _on_ray(model, data, settings)
    scan.prepare()
    first = scan.report.targets[0].name
    # every target but the first already measured: what is left is one target, and two workers
    scan.report.rows.extend(r for r in here.report.rows if r.layer != first)
    new = list(scan.run())
    assert sorted((r.layer, r.ratio) for r in new) == [(first, r) for r in settings.ratios]
    assert scan.ray_stats.workers == 2
    assert [rows for _, rows, _ in scan.ray_stats.units] == [1, 1, 1, 1]
    assert _diff(_rows(here), _rows(scan)) <= 1e-6


def test_split_units():
    todo = [("a", [0.1, 0.2, 0.3, 0.4, 0.5]), ("b", [0.5])]
    assert split_units(todo, 1) == todo  # two targets for one worker: as they are
    assert split_units(todo, 2) == [("a", [0.1, 0.2]), ("a", [0.3, 0.4, 0.5]), ("b", [0.5])]
    many = split_units([("a", [0.1 * i for i in range(1, 10)])], 64)
    assert len(many) == 9 and all(len(ratios) == 1 for _, ratios in many)
    assert split_units([], 4) == []


def test_ray_scan_unstructured(local_ray, demo):
    model, data = demo
    data = data.subset(40)
    settings = ScanSettings("unstructured", "accuracy", "exact", (0.5,), "l2", 64)
    here = SensitivityScan(model, data, settings, use_cache=False)
    here.prepare()
    list(here.run())
    on_ray = _on_ray(model, data, settings)
    on_ray.prepare()
    list(on_ray.run())
    assert _diff(_rows(here), _rows(on_ray)) <= 1e-6


def test_cancel_stops_the_workers(local_ray, demo):
    model, data = demo
    scan = _on_ray(model, data, _settings())
    scan.prepare()
    cancel = CancelToken()
    rows = []
    with pytest.raises(Cancelled):
        for row in scan.run(cancel=cancel):
            rows.append(row)
            cancel.cancel()
    assert 1 <= len(rows) < 12 * len(RATIOS)
    assert _wait(lambda: not _worker_pids(), 20), "Ray scan workers still run after cancel"


def test_a_lost_worker_ends_the_scan_with_one_line(local_ray, demo):
    model, data = demo
    scan = _on_ray(model, data, _settings())
    scan.prepare()
    rows = []
    # a worker killed before its start-up task finished "could not start", one killed later
    # "was lost": which one the driver sees first depends on timing
    lost = "a Ray worker (was lost|could not start)"
    with pytest.raises(StudioError, match=lost) as caught:
        for row in scan.run():
            rows.append(row)
            if len(rows) == 1:
                for pid in _worker_pids():
                    os.kill(pid, signal.SIGKILL)
    assert "\n" not in str(caught.value)
    assert len(scan.report.rows) == len(rows) >= 1  # what finished is kept (and cached)


def test_local_instance_listens_on_loopback_with_token_auth(local_ray):
    import ray

    assert local_ray.started_here and local_ray.gcs_address.startswith("127.0.0.1:")
    assert local_ray.cpus >= 1 and local_ray.alive_nodes == 1
    assert all(node.host == "127.0.0.1" for node in local_ray.nodes)
    listening = _listening_addresses()
    assert listening, "found no listening sockets of Ray's processes"
    assert all(addr in LOOPBACK for addr in listening), listening

    @ray.remote
    def auth_mode() -> str | None:
        return os.environ.get("RAY_AUTH_MODE")

    assert ray.get(auth_mode.remote()) == "token"


def test_addresses_are_checked_before_connecting(monkeypatch):
    for good in ("local", "auto", "ray://head:10001", "10.0.0.5:6379"):
        assert check_address(good) == good
    for bad in ("", "ray://head", "head:port", "1.2.3.4:99999"):
        with pytest.raises(StudioError):
            check_address(bad)
    with pytest.raises(StudioError, match="could not connect to Ray at 127.0.0.1:9"):
        Cluster.connect("127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(Cluster, "_current", None)
    with pytest.raises(StudioError, match="token authentication"):
        Cluster.connect("local")


def test_killed_scan_resumes_from_the_cache(tmp_path, local_ray):
    """A `studio scan --ray local` killed halfway: the next run computes only the rest."""
    import numpy as np

    small = load_data("demo").subset(90)
    np.savez(tmp_path / "small.npz", x=small.x.numpy(), y=small.y.numpy())
    env = {**os.environ, "STUDIO_CACHE_DIR": str(tmp_path / "cache")}
    args = ["scan", "--model", "demo", "--data", str(tmp_path / "small.npz"), "--ray", "local"]
    args += ["--workers", "1", "--ratios", "0.2,0.4,0.6,0.8"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "studio", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folder = tmp_path / "cache" / "sensitivity"
    try:
        assert _wait(lambda: _cached_rows(folder) >= 8, 240), "no rows reached the cache"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _cached_rows(folder)
    assert 8 <= done < 48
    model, data = load_model("demo"), load_data(str(tmp_path / "small.npz"))
    settings = ScanSettings("structured", "accuracy", "exact", (0.2, 0.4, 0.6, 0.8), "l2", 256)
    os.environ["STUDIO_CACHE_DIR"], before = str(tmp_path / "cache"), os.environ["STUDIO_CACHE_DIR"]
    try:
        scan = SensitivityScan(model, data, settings, workers=2, ray_address="local")
        scan.prepare()
        new = list(scan.run())
    finally:
        os.environ["STUDIO_CACHE_DIR"] = before
    assert scan.report.cached_rows == done
    assert len(new) == 48 - done == sum(rows for _, rows, _ in scan.ray_stats.units)
    assert {(r.layer, r.ratio) for r in new}.isdisjoint(
        {(r.layer, r.ratio) for r in scan.report.rows[:done]}
    )
    assert len(_rows(scan)) == 48


# ---- helpers ------------------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _wait(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _cached_rows(folder: Path) -> int:
    best = 0
    for path in folder.glob("*.json"):
        try:
            best = max(best, len(json.loads(path.read_text())["rows"]))
        except (OSError, ValueError, KeyError):
            pass
    return best


def _processes() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode()
            except OSError:
                pass
    return found


def _worker_pids() -> list[int]:
    return [pid for pid, cmd in _processes().items() if cmd.startswith("ray::ScanWorker")]


def _listening_addresses() -> set[str]:
    """Local addresses of the listening TCP sockets held by Ray's processes."""
    ray_pids = [
        pid
        for pid, cmd in _processes().items()
        if "gcs_server" in cmd or "raylet" in cmd or cmd.startswith("ray::")
    ]
    inodes = set()
    for pid in ray_pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                found.add(_address(parts[1].split(":")[0], width))
    return found


def _address(hexed: str, width: int) -> str:
    raw = bytes.fromhex(hexed)
    if width == 4:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    packed = b"".join(words)
    import ipaddress

    addr = ipaddress.IPv6Address(packed)
    return str(addr.ipv4_mapped and f"::ffff:{addr.ipv4_mapped}" or addr)


def test_cli_csv_on_ray_equals_the_in_process_csv(tmp_path, local_ray, capsys):
    import numpy as np

    from studio.cli import main

    small = load_data("demo").subset(60)
    np.savez(tmp_path / "small.npz", x=small.x.numpy(), y=small.y.numpy())
    common = ["scan", "--model", "demo", "--data", str(tmp_path / "small.npz")]
    common += ["--ratios", "0.25,0.5", "--no-cache"]
    assert main([*common, "--out", str(tmp_path / "here.csv")]) == 0
    assert (
        main([*common, "--ray", "local", "--workers", "2", "--out", str(tmp_path / "ray.csv")]) == 0
    )
    out = capsys.readouterr().out
    assert "ran on local Ray at 127.0.0.1" in out and "with 2 workers" in out
    here = (tmp_path / "here.csv").read_text().splitlines()
    there = (tmp_path / "ray.csv").read_text().splitlines()
    assert here[0] == there[0] and len(here) == len(there) == 1 + 12 * 2
    for a, b in zip(here[1:], there[1:]):
        cells_a, cells_b = a.split(","), b.split(",")
        assert cells_a[:3] == cells_b[:3]  # layer, ratio, metric
        for x, y in zip(cells_a[3:], cells_b[3:]):
            assert abs(float(x) - float(y)) <= 1e-6, (a, b)
    assert Cluster._current is not None  # the fixture's connection is left to the fixture
