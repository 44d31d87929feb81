"""Test-wide settings: Qt offscreen, caches and settings in a temporary folder."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("STUDIO_CACHE_DIR", tempfile.mkdtemp(prefix="studio-cache-"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for a test: small models run faster so, and far faster on shared
    cores (scans and training set their own count, so it is set again before every test)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config: pytest.Config) -> None:
    """Job processes start with transformers imported: the suite opens many transformers, and
    each of their jobs would otherwise import it again (seconds on two cores)."""
    from studio.core import isolation

    isolation.preload_transformers()
