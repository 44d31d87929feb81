"""A pruning plan: what to cut, by how much, and how to choose what goes. A recipe is a plan
on disk (YAML or JSON), readable by a person and replayed headless by ``studio prune``.

Ratios are keyed by target name: the leading (root) layer of a dependency group for
``structured`` plans (the names the structured sensitivity scan uses), the module owning the
weight for ``unstructured`` and ``nm``, and the block module for ``blocks`` (1.0 = the block is
replaced by its shortcut, 0.0 = kept).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from studio.core.errors import StudioError
from studio.core.files import write_atomic

METHODS = ("structured", "unstructured", "nm", "blocks")
CRITERIA = ("l2", "l1", "taylor", "bn_scale", "apoz", "activation", "random")
NEEDS_DATA = ("taylor", "apoz", "activation")
CHANNEL_ONLY = ("bn_scale", "apoz", "activation")  # rank channels, not single weights
DEFAULT_CAP = 0.9
RECIPE_VERSION = 1


@dataclass(frozen=True)
class PruningPlan:
    """A frozen, serialisable pruning plan. ``ratios`` maps target name -> fraction in [0, cap]."""

    method: str = "structured"
    criterion: str = "l2"
    ratios: Mapping[str, float] = field(default_factory=dict)
    locked: tuple[str, ...] = ()  # the allocator leaves these ratios as they are
    ignored: tuple[str, ...] = ()  # never pruned, whatever their ratio says
    cap: float = DEFAULT_CAP  # largest ratio any one target may get (nm: fixed 2:4)
    model_fingerprint: str = ""  # the model the plan was made for ("" = any)
    seed: int = 0  # for the random criterion
    recalibrate_bn: bool = True  # re-estimate batch-norm statistics on data after pruning
    round_to: int = 1  # structured allocation keeps channel counts that are multiples of this
    target: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"macs": 0.5, "allocate": ..}

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StudioError(
                f"unknown pruning method {self.method!r}: choose one of {', '.join(METHODS)}"
            )
        if self.criterion not in CRITERIA:
            raise StudioError(
                f"unknown criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}"
            )
        if not 0.0 < self.cap <= 1.0:
            raise StudioError(f"the per-layer cap must be in (0, 1], not {self.cap}")
        if (
            isinstance(self.round_to, bool)
            or not isinstance(self.round_to, int)
            or not (1 <= self.round_to <= 256)
        ):
            raise StudioError(
                f"round_to must be a whole number from 1 to 256, not {self.round_to!r}"
            )
        limit = 1.0 if self.method == "blocks" else self.cap
        for name, ratio in self.ratios.items():
            if not isinstance(ratio, int | float) or math.isnan(ratio):
                raise StudioError(f"ratio of {name} must be a number, not {ratio!r}")
            if not 0.0 <= ratio <= limit + 1e-12:
                raise StudioError(
                    f"ratio of {name} is {ratio:g}: it must be between 0 and {limit:g}"
                )
        object.__setattr__(self, "ratios", dict(self.ratios))
        object.__setattr__(self, "target", dict(self.target))
        object.__setattr__(self, "locked", tuple(self.locked))
        object.__setattr__(self, "ignored", tuple(self.ignored))

    def ratio(self, name: str) -> float:
        """The ratio of ``name`` (0 for unlisted and ignored targets)."""
        return 0.0 if name in self.ignored else float(self.ratios.get(name, 0.0))

    def with_ratios(self, ratios: Mapping[str, float]) -> PruningPlan:
        """A copy with these ratios changed (clipped to the cap)."""
        limit = 1.0 if self.method == "blocks" else self.cap
        merged = dict(self.ratios)
        merged.update({k: min(max(float(v), 0.0), limit) for k, v in ratios.items()})
        return replace(self, ratios=merged)

    def active(self) -> dict[str, float]:
        """Targets that will actually be pruned, with their ratios."""
        return {n: r for n, r in self.ratios.items() if r > 0 and n not in self.ignored}

    # --- recipes -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "studio_recipe": RECIPE_VERSION,
            "method": self.method,
            "criterion": self.criterion,
            "cap": self.cap,
            "seed": self.seed,
            "recalibrate_bn": self.recalibrate_bn,
            "round_to": self.round_to,
            "model_fingerprint": self.model_fingerprint,
            "target": dict(self.target),
            "locked": list(self.locked),
            "ignored": list(self.ignored),
            "ratios": {k: round(float(v), 6) for k, v in self.ratios.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> PruningPlan:
        if not isinstance(data, dict):
            raise StudioError(f"{source} is not a pruning recipe (expected a mapping at the top)")
        version = data.get("studio_recipe", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise StudioError(
                f"{source} is recipe version {version}; this studio reads {RECIPE_VERSION}"
            )
        known = {
            "studio_recipe",
            "method",
            "criterion",
            "cap",
            "seed",
            "recalibrate_bn",
            "round_to",
            "model_fingerprint",
            "target",
            "locked",
            "ignored",
            "ratios",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise StudioError(f"{source}: unknown field(s) {', '.join(map(str, unknown))}")
        ratios = data.get("ratios") or {}
        if not isinstance(ratios, dict):
            raise StudioError(f"{source}: 'ratios' must map layer names to fractions")
        try:
            return cls(
                method=str(data.get("method", "structured")),
                criterion=str(data.get("criterion", "l2")),
                ratios={str(k): float(v) for k, v in ratios.items()},
                locked=tuple(str(x) for x in data.get("locked") or ()),
                ignored=tuple(str(x) for x in data.get("ignored") or ()),
                cap=float(data.get("cap", DEFAULT_CAP)),
                model_fingerprint=str(data.get("model_fingerprint") or ""),
                seed=int(data.get("seed", 0)),
                recalibrate_bn=_boolean(data.get("recalibrate_bn", True), "recalibrate_bn"),
                round_to=int(data.get("round_to", 1)),
                target=dict(data.get("target") or {}),
            )
        except (TypeError, ValueError) as exc:
            raise StudioError(f"{source}: {exc}") from None

    def save(self, path: str | Path, protected: tuple[Path, ...] = ()) -> Path:
        """Write the recipe as YAML (.yaml/.yml) or JSON (.json), atomically."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix.lower() == ".json":
            text = json.dumps(data, indent=2) + "\n"
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = "# Pruning Studio recipe: replay with `studio prune --recipe FILE`\n"
            text += yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        else:
            raise StudioError(
                f"a recipe is saved as .yaml or .json, not {path.suffix or path.name}"
            )
        return write_atomic(path, text, protected)

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        """Read a recipe written by :meth:`save` (or by hand), with one-line errors."""
        path = Path(path)
        if not path.is_file():
            raise StudioError(f"recipe {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise StudioError(f"cannot read recipe {path.name}: {exc}") from None
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StudioError(f"recipe {path.name} is not valid JSON: {exc}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                first = str(exc).splitlines()[0]
                raise StudioError(f"recipe {path.name} is not valid YAML: {first}") from None
        return cls.from_dict(data, f"recipe {path.name}")

    def check_model(self, fingerprint: str, names: set[str] | None = None) -> None:
        """Refuse a plan made for another model, or naming targets the model does not have."""
        if self.model_fingerprint and fingerprint and self.model_fingerprint != fingerprint:
            raise StudioError(
                "the recipe was made for another model (fingerprint "
                f"{self.model_fingerprint[:12]}, this one is {fingerprint[:12]})"
            )
        if names is not None:
            missing = sorted(set(self.ratios) - names)
            if missing:
                shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
                raise StudioError(
                    f"the recipe names {len(missing)} layer(s) this model does not have: {shown}"
                )


def _boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"'{name}' must be true or false, not {value!r}")
