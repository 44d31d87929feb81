"""How numbers, sizes, shapes and durations are written in the studio's panels."""

from __future__ import annotations

from collections.abc import Sequence

DASH = "—"


def thousands(value: int | None) -> str:
    """``1234567`` -> ``1,234,567``."""
    return DASH if value is None else f"{int(value):,}"


def compact(value: float | None, unit: str = "") -> str:
    """``40_812_544`` -> ``40.8 M``: short form with a metric suffix."""
    if value is None:
        return DASH
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {suffix}{unit}"
    return f"{value:,.0f} {unit}".rstrip()


def count(value: int | None) -> str:
    """Exact count plus short form: ``272,474 (272.5 K)``."""
    if value is None:
        return DASH
    return thousands(value) if abs(value) < 1000 else f"{thousands(value)}  ({compact(value)})"


def file_size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return DASH
    size = float(n_bytes)
    for suffix in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or suffix == "GiB":
            return f"{size:,.0f} {suffix}" if suffix == "bytes" else f"{size:,.1f} {suffix}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - unreachable


def shape(dims: Sequence[int] | None) -> str:
    """``(1, 16, 32, 32)`` -> ``1×16×32×32``."""
    if dims is None:
        return DASH
    return "×".join(str(int(d)) for d in dims) if len(dims) else "scalar"


def percent(fraction: float | None, digits: int = 1) -> str:
    return DASH if fraction is None else f"{fraction * 100:.{digits}f} %"


def duration(seconds: float | None) -> str:
    """Short human duration: ``8 s``, ``2 min 05 s``, ``1 h 03 min``."""
    if seconds is None:
        return ""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"
