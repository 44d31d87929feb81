"""Where bundled resources and per-user caches live."""

from __future__ import annotations

import os
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[2] / "resources"
DEMO_WEIGHTS = RESOURCES / "demo_resnet20_digits.pt"
DEMO_LM_DIR = RESOURCES / "demo-lm"


def cache_dir() -> Path:
    """Per-user cache folder (STUDIO_CACHE_DIR overrides, for tests)."""
    root = os.environ.get("STUDIO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pruning-studio"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
