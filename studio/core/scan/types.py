"""Values exchanged by the sensitivity scan: its settings, its targets and its result rows."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field

import numpy as np

from studio.core.errors import StudioError

MODES = ("structured", "unstructured", "nm")
METRICS = ("accuracy", "loss", "fidelity")
METHODS = ("exact", "naive", "taylor")
CRITERIA = ("l2", "l1", "apoz", "activation")
CHANNEL_CRITERIA = ("apoz", "activation")  # measured on data, per channel: structured only
DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 10))
NM_RATIOS = (0.25, 0.5, 0.75)  # 1:4, 2:4 and 3:4 zeros in every group of 4 weights
NM_GROUP = 4


@dataclass(frozen=True)
class ScanSettings:
    """What to scan and how. ``ratios`` are fractions of channels (structured), of weights
    (unstructured), or of every group of 4 consecutive input weights (nm: 0.5 is 2:4)."""

    mode: str = "structured"
    metric: str = "accuracy"
    method: str = "exact"
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    criterion: str = "l2"
    batch_size: int = 256

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.mode, MODES, "mode"),
            (self.metric, METRICS, "metric"),
            (self.method, METHODS, "method"),
            (self.criterion, CRITERIA, "criterion"),
        ):
            if value not in allowed:
                raise StudioError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")
        if self.criterion in CHANNEL_CRITERIA and self.mode != "structured":
            raise StudioError(
                f"the {self.criterion} criterion ranks channels: use it with mode structured"
            )
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise StudioError("ratios must be fractions strictly between 0 and 1, e.g. 0.1,0.5,0.9")
        if self.method == "taylor" and self.metric != "loss":
            raise StudioError(
                "the taylor method estimates the increase in loss: use --metric loss with it"
            )
        if self.mode == "nm" and any(
            abs(r * NM_GROUP - round(r * NM_GROUP)) > 1e-9 for r in self.ratios
        ):
            raise StudioError("nm ratios must be multiples of 1/4 (0.25, 0.5 = 2:4, 0.75)")

    @staticmethod
    def default_ratios(mode: str) -> tuple[float, ...]:
        return NM_RATIOS if mode == "nm" else DEFAULT_RATIOS

    @staticmethod
    def for_allocation(mode: str, labelled: bool) -> ScanSettings:
        """The scan that sensitivity allocation runs when none is given: the Sensitivity tab's
        and ``studio scan``'s defaults, so that all three share one cache."""
        metric = "accuracy" if labelled else "fidelity"
        return ScanSettings(mode, metric, ratios=ScanSettings.default_ratios(mode))

    def cache_fields(self) -> dict[str, object]:
        """The settings that change measured numbers (not metric or ratios: rows store all
        metrics, one row per ratio)."""
        return {"mode": self.mode, "method": self.method, "criterion": self.criterion}


@dataclass(frozen=True)
class ScanTarget:
    """One row of the heatmap: a dependency group (structured) or one weight tensor."""

    name: str  # leading layer of the group, or the module owning the weight
    layers: tuple[str, ...]  # every layer that changes when this target is pruned
    size: int  # channels in the group, or weights in the tensor
    params: int  # parameters in the layers of the target


@dataclass(frozen=True)
class ScanRow:
    """The quality after pruning ``layer`` alone by ``ratio``; all metrics are kept."""

    layer: str
    ratio: float
    accuracy: float | None  # None for unlabeled data and for estimates
    loss: float  # cross-entropy with the labels, or with the unpruned model's top-1 if unlabeled
    agreement: float  # top-1 agreement with the unpruned model (NaN for estimates)
    kl: float  # KL(unpruned || pruned) (NaN for estimates)
    estimate: bool = False  # True for the taylor method: a prediction, not a measurement
    error: str = ""  # why this cell could not be measured (its values are NaN)

    def value(self, metric: str) -> float:
        if metric == "fidelity":
            return self.agreement
        value = getattr(self, metric)
        if value is None:
            raise StudioError(f"{metric} needs labelled data: use --metric fidelity or loss")
        return float(value)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class ScanReport:
    """A finished (or partly finished) scan: baseline, targets and rows."""

    settings: ScanSettings
    targets: list[ScanTarget]
    baseline: ScanRow  # ratio 0
    rows: list[ScanRow] = field(default_factory=list)
    seconds: float = 0.0
    cached_rows: int = 0  # rows that came from the cache instead of being measured

    def drop(self, row: ScanRow, metric: str | None = None) -> float:
        """How much worse ``row`` is than the baseline (positive = worse)."""
        metric = metric or self.settings.metric
        delta = row.value(metric) - self.baseline.value(metric)
        return (delta if metric == "loss" else -delta) + 0.0  # no negative zeros

    def matrix(self, metric: str | None = None) -> tuple[list[str], list[float], np.ndarray]:
        """Targets in model order x ratios, as a drop matrix (NaN where not measured yet)."""
        names = [t.name for t in self.targets]
        ratios = sorted(set(self.settings.ratios))
        grid = np.full((len(names), len(ratios)), np.nan)
        index = {n: i for i, n in enumerate(names)}
        for row in self.rows:
            if row.layer in index and row.ratio in ratios:
                grid[index[row.layer], ratios.index(row.ratio)] = self.drop(row, metric)
        return names, ratios, grid

    def to_csv(self, metric: str | None = None) -> str:
        metric = metric or self.settings.metric
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["layer", "ratio", "metric", "value", "baseline", "drop", "estimate"])
        base = self.baseline.value(metric)
        for row in self.rows:
            writer.writerow(
                [
                    row.layer,
                    row.ratio,
                    metric,
                    repr(row.value(metric)),
                    repr(base),
                    repr(self.drop(row, metric)),
                    int(row.estimate),
                ]
            )
        return out.getvalue()

    @classmethod
    def from_dict(cls, data: object, source: str = "scan") -> ScanReport:
        """Read the JSON written by ``studio scan --out x.json`` (extra keys are ignored)."""
        row_fields = set(ScanRow.__dataclass_fields__)

        def row(item: dict) -> ScanRow:
            return ScanRow(**{k: v for k, v in item.items() if k in row_fields})

        if not isinstance(data, dict):
            raise StudioError(f"{source} is not a sensitivity scan (expected a JSON object)")
        try:
            s = data["settings"]
            settings = ScanSettings(
                str(s["mode"]),
                str(s.get("metric") or data.get("metric") or "accuracy"),
                str(s.get("method", "exact")),
                tuple(float(r) for r in s["ratios"]),
                str(s.get("criterion", "l2")),
                int(s.get("batch_size", 256)),
            )
            targets = [
                ScanTarget(str(t["name"]), tuple(t["layers"]), int(t["size"]), int(t["params"]))
                for t in data["targets"]
            ]
            return cls(settings, targets, row(data["baseline"]), [row(r) for r in data["rows"]])
        except StudioError as exc:
            raise StudioError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else (str(exc) or "?")
            raise StudioError(
                f"{source} is not a sensitivity scan written by studio scan: {what.splitlines()[0]}"
            ) from None
