from __future__ import annotations

import threading

import pytest

from studio.core.errors import Cancelled
from studio.core.jobs import CancelToken, check, report, sub_progress


def test_sub_progress_maps_into_a_slice_and_clamps() -> None:
    seen: list[tuple[float, str]] = []
    part = sub_progress(lambda f, m: seen.append((f, m)), 0.5, 0.75)
    part(0.0, "a")
    part(0.5, "b")
    part(2.0, "c")
    assert seen == [(0.5, "a"), (0.625, "b"), (0.75, "c")]
    assert sub_progress(None, 0, 1) is None
    report(None, 0.3)  # no callback: nothing happens


def test_cancel_token_across_threads() -> None:
    token = CancelToken()
    check(token)
    check(None)
    worker = threading.Thread(target=token.cancel)
    worker.start()
    worker.join()
    assert token.cancelled
    with pytest.raises(Cancelled, match="cancelled"):
        token.check()
