"""Where the latency tables live: one JSON file per machine (CPU model), runtime and version,
and thread count, in the studio's cache folder; read whole, merged on write (another build may
have added entries), replaced atomically."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from studio.core.files import write_atomic
from studio.core.paths import cache_dir

CACHE_VERSION = 2  # 2: NCHWc regimes by ONNX Runtime's real rule, minimum of PASSES passes


def machine_key(runtime: str, threads: int) -> str:
    """Names this machine, runtime (and its version) and thread count in cache file names."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if runtime == "onnxruntime":
        import onnxruntime

        version = onnxruntime.__version__
    else:
        version = torch.__version__
    text = f"{cpu}|{platform.machine()}|{runtime}|{version}"
    return f"{runtime}-{hashlib.sha256(text.encode()).hexdigest()[:12]}-t{threads}"


def cache_path(runtime: str, threads: int) -> Path:
    folder = cache_dir() / "latency"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{machine_key(runtime, threads)}.json"


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"version": CACHE_VERSION, "table": {}, "fits": {}}
    if data.get("version") != CACHE_VERSION:
        return {"version": CACHE_VERSION, "table": {}, "fits": {}}
    return data


def write_cache(path: Path, table: dict[str, float], fits: dict[str, dict]) -> None:
    """Merge into what is on disk now (another build may have added entries) and replace."""
    data = read_cache(path)
    data["table"].update(table)
    data["fits"].update(fits)
    write_atomic(path, json.dumps(data))
