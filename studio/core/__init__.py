"""Headless engine of Pruning Studio. Never imports Qt (enforced by tests/core/test_no_qt.py)."""
