"""Is the model the studio hands over faster than the original? Measured, side by side.

After Apply, fine-tuning and Export (and ``studio prune``/``export``) the new variant and the
original are timed in interleaved passes for a second or two (:func:`measure_passes`: both
see the same machine state), and each one's quiet latency (its fastest pass) is compared. When
the variant is not faster, :func:`slow_reasons` says why in one line: the layers whose channel
counts left the runtime's fast path (not multiples of its channel block, where the original's
were), or, when none did, that the pruned layers are too small for fewer MACs to pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from studio.core.jobs import CancelToken, ProgressFn
from studio.core.latency.alignment import channel_multiple
from studio.core.latency.fit import measure_passes, quiet
from studio.core.latency.measure import default_threads
from studio.core.models.loaded import LoadedModel

CHECK_SECONDS = 1.5
PASSES = 6
RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "torch": "PyTorch"}
SHOWN = 3  # layers named in the one line


@dataclass
class SpeedCheck:
    """The variant's quiet latency against the original's, measured side by side."""

    runtime: str
    batch: int
    threads: int
    original_ms: float
    variant_ms: float
    multiple: int = 1
    off_path: list[tuple[str, int]] = field(default_factory=list)  # (layer, channels)
    macs_fraction: float | None = None
    figure: str = "quiet"  # which figure of each: the fastest pass's median, or the median

    @property
    def speedup(self) -> float:
        return self.original_ms / max(self.variant_ms, 1e-9)

    @property
    def faster(self) -> bool:
        return self.speedup >= 1.0

    def settings(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{RUNTIME_NAMES.get(self.runtime, self.runtime)}, batch {self.batch}, {threads}"

    def reason(self) -> str:
        """Why a variant is not faster (empty when it is)."""
        if self.faster:
            return ""
        if self.off_path:
            shown = ", ".join(f"{name} ({c})" for name, c in self.off_path[:SHOWN])
            more = f" and {len(self.off_path) - SHOWN} more" if len(self.off_path) > SHOWN else ""
            return (
                f"{len(self.off_path)} layer(s) keep channel counts off the "
                f"{self.multiple}-channel fast path: {shown}{more}"
            )
        macs = f" (MACs at {self.macs_fraction:.0%})" if self.macs_fraction is not None else ""
        return (
            f"no layer left the fast path: the pruned layers are memory- or overhead-bound{macs}, "
            "so fewer MACs do not pay; prune fewer, larger layers or raise the batch"
        )

    def line(self) -> str:
        """One line: the speed-up, or that the variant is not faster, why, and the fix."""
        times = (
            f"{self.variant_ms:.3f} vs {self.original_ms:.3f} ms {self.figure}, {self.settings()}"
        )
        if self.faster:
            return f"{self.speedup:.2f}x faster than the original ({times})"
        fix = "; re-plan with runtime channels" if self.off_path else ""
        return (
            f"not faster: {self.speedup:.2f}x the original's speed ({times}): {self.reason()}{fix}"
        )

    def to_dict(self) -> dict:
        return {
            "speedup": round(self.speedup, 4),
            "faster": self.faster,
            "original_ms": round(self.original_ms, 4),
            "variant_ms": round(self.variant_ms, 4),
            "runtime": self.runtime,
            "batch": self.batch,
            "threads": self.threads,
            "off_path": [name for name, _c in self.off_path],
            "reason": self.reason(),
        }


def check_speed(
    original: LoadedModel,
    variant: LoadedModel,
    runtime: str = "onnxruntime",
    batch: int = 1,
    threads: int | None = None,
    seconds: float = CHECK_SECONDS,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> SpeedCheck:
    """Time ``variant`` against ``original`` side by side (CPU) and explain a slow result."""
    threads = threads or default_threads()
    passes = measure_passes(
        [original, variant], runtime, batch, threads, PASSES, progress, cancel, seconds
    )
    original_ms, variant_ms = (float(v) for v in quiet(passes))
    multiple = channel_multiple(runtime).multiple
    result = SpeedCheck(runtime, batch, threads, original_ms, variant_ms, multiple)
    if not result.faster:
        result.off_path = slow_reasons(original.module, variant.module, multiple)
        result.macs_fraction = _macs_fraction(original, variant)
    return result


def slow_reasons(original: nn.Module, variant: nn.Module, multiple: int) -> list[tuple[str, int]]:
    """Layers of ``variant`` whose output channels are not a multiple of ``multiple`` where
    the same layer of ``original`` had a multiple (or that the original lacks), with the count."""
    before = dict(original.named_modules())
    off = []
    for name, mod in variant.named_modules():
        count = _channels(mod)
        if count is None or count % multiple == 0 or count < multiple:
            continue
        was = _channels(before.get(name)) if name in before else None
        if was is None or was % multiple == 0:
            off.append((name, count))
    return off


def _channels(mod: nn.Module | None) -> int | None:
    if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return mod.out_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features
    return None


def _macs_fraction(original: LoadedModel, variant: LoadedModel) -> float | None:
    from studio.core.models.inventory import trace_layers

    try:
        _s, before = trace_layers(original.module, original.example_input())
        _s, after = trace_layers(variant.module, variant.example_input())
    except Exception:  # only for the wording of the reason
        return None
    return sum(after.values()) / max(1, sum(before.values()))
