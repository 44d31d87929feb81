"""Target devices: profiles on disk, and a per-layer roofline estimate of latency and energy.

A profile (YAML, see ``resources/devices/``) gives a device's peak operations per second per
data type, memory bandwidth, the fraction of peak each kind of layer reaches, energy per MAC and
per byte of DRAM traffic, and which sparsity the hardware skips (``dense``, ``2:4`` or
``unstructured``). Users add their own profiles to :func:`user_devices_dir`. Each layer takes
``max(compute, memory) + overhead``: compute is 2 * MACs / (peak * efficiency), memory is the
weights plus input and output activations over the bandwidth (weights are free when they fit
the on-chip memory). Everything here is an estimate and labelled so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.errors import StudioError
from studio.core.paths import RESOURCES

DEVICES_DIR = RESOURCES / "devices"
DTYPES = ("fp32", "fp16", "int8")
BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
SPARSITY = ("dense", "2:4", "unstructured")
OPS = ("conv", "dwconv", "linear", "other")


@dataclass(frozen=True)
class DeviceProfile:
    """A target device as its published figures describe it."""

    name: str
    title: str
    source: str
    peak_ops: dict[str, float]  # operations (2 per MAC) per second, per data type
    memory_bandwidth: float  # bytes per second
    efficiency: dict[str, float] = field(default_factory=dict)  # op kind -> fraction of peak
    energy_pj_per_mac: dict[str, float] = field(default_factory=dict)
    energy_pj_per_byte: float = 0.0  # DRAM traffic
    sparsity: str = "dense"
    on_chip_bytes: float = 0.0  # weights up to this size stay on chip (no DRAM traffic)
    overhead_us: float = 0.0  # per layer (kernel launch, dispatch)
    default_dtype: str = "fp32"
    notes: str = ""
    path: Path | None = None

    def peak(self, dtype: str) -> float:
        value = self.peak_ops.get(dtype, 0.0)
        if value <= 0:
            known = ", ".join(k for k, v in self.peak_ops.items() if v > 0)
            raise StudioError(f"{self.name} does not run {dtype}: it runs {known}")
        return value

    def efficiency_of(self, op: str) -> float:
        return self.efficiency.get(op, self.efficiency.get("other", 1.0))

    def exploits(self, pattern: str) -> bool:
        """Whether the device skips zeros of ``pattern`` ('2:4' or 'unstructured')."""
        if self.sparsity == "unstructured":
            return pattern in ("2:4", "unstructured")
        return self.sparsity == pattern == "2:4"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "source": self.source,
            "peak_ops": dict(self.peak_ops),
            "memory_bandwidth": self.memory_bandwidth,
            "efficiency": dict(self.efficiency),
            "energy_pj_per_mac": dict(self.energy_pj_per_mac),
            "energy_pj_per_byte": self.energy_pj_per_byte,
            "sparsity": self.sparsity,
            "on_chip_bytes": self.on_chip_bytes,
            "overhead_us": self.overhead_us,
            "default_dtype": self.default_dtype,
            "notes": self.notes,
        }


def user_devices_dir() -> Path:
    """Where users put their own profiles: $STUDIO_DEVICES_DIR, else
    $XDG_CONFIG_HOME/pruning-studio/devices (~/.config/pruning-studio/devices)."""
    root = os.environ.get("STUDIO_DEVICES_DIR")
    if root:
        return Path(root)
    config = os.environ.get("XDG_CONFIG_HOME", os.path.expanduser("~/.config"))
    return Path(config) / "pruning-studio" / "devices"


def list_devices() -> list[DeviceProfile]:
    """Bundled profiles, then the user's (a user profile replaces a bundled one of its name)."""
    found: dict[str, DeviceProfile] = {}
    for folder in (DEVICES_DIR, user_devices_dir()):
        if folder.is_dir():
            for path in sorted(folder.glob("*.y*ml")):
                profile = load_device(path)
                found[profile.name] = profile
    return list(found.values())


def find_device(spec: str) -> DeviceProfile:
    """A profile by name (bundled or the user's) or by file path."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        return load_device(path)
    for profile in list_devices():
        if profile.name == spec:
            return profile
    names = ", ".join(p.name for p in list_devices())
    raise StudioError(f"no device profile named {spec!r}: choose one of {names}, or a .yaml file")


def load_device(path: str | Path) -> DeviceProfile:
    """Read and validate a profile; any problem is one line naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise StudioError(f"cannot read device profile {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise StudioError(f"device profile {path.name} is not valid YAML: {first}") from None
    try:
        return parse_device(data, path)
    except (ValueError, TypeError) as exc:
        raise StudioError(f"device profile {path.name}: {exc}") from None


def _number(value: Any, what: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what} must be a number, not {value!r}")
    number = float(value)
    if number < 0 or (positive and number == 0) or number != number:
        raise ValueError(f"{what} must be {'positive' if positive else '>= 0'}, not {value!r}")
    return number


def _table(value: Any, what: str, keys: tuple[str, ...]) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must map {', '.join(keys)} to numbers")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {', '.join(map(str, unknown))}")
    return {k: _number(v, f"{what}.{k}") for k, v in value.items()}


def parse_device(data: Any, path: Path | None = None) -> DeviceProfile:
    """A :class:`DeviceProfile` from a profile's parsed YAML (ValueError when invalid)."""
    if not isinstance(data, dict):
        raise ValueError("a profile is a mapping of fields (name, source, peak_ops, ...)")
    for key in ("name", "source", "peak_ops", "memory_bandwidth"):
        if key not in data:
            raise ValueError(f"the field '{key}' is missing")
    known = set(DeviceProfile.__dataclass_fields__) - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(str, unknown))}")
    peak = _table(data["peak_ops"], "peak_ops", DTYPES)
    if not any(v > 0 for v in peak.values()):
        raise ValueError("peak_ops needs at least one data type with a positive value")
    efficiency = _table(data.get("efficiency"), "efficiency", OPS)
    if any(not 0 < v <= 1 for v in efficiency.values()):
        raise ValueError("efficiency factors are fractions of peak in (0, 1]")
    sparsity = str(data.get("sparsity", "dense"))
    if sparsity not in SPARSITY:
        raise ValueError(f"sparsity must be one of {', '.join(SPARSITY)}, not {sparsity!r}")
    dtype = str(data.get("default_dtype", "fp32"))
    if peak.get(dtype, 0) <= 0:
        raise ValueError(f"default_dtype {dtype} has no peak_ops value")
    source = str(data["source"]).strip()
    if not source:
        raise ValueError("'source' must cite the published specification")
    return DeviceProfile(
        name=str(data["name"]),
        title=str(data.get("title", data["name"])),
        source=source,
        peak_ops=peak,
        memory_bandwidth=_number(data["memory_bandwidth"], "memory_bandwidth", positive=True),
        efficiency=efficiency,
        energy_pj_per_mac=_table(data.get("energy_pj_per_mac"), "energy_pj_per_mac", DTYPES),
        energy_pj_per_byte=_number(data.get("energy_pj_per_byte", 0.0), "energy_pj_per_byte"),
        sparsity=sparsity,
        on_chip_bytes=_number(data.get("on_chip_bytes", 0.0), "on_chip_bytes"),
        overhead_us=_number(data.get("overhead_us", 0.0), "overhead_us"),
        default_dtype=dtype,
        notes=str(data.get("notes", "")),
        path=path,
    )
