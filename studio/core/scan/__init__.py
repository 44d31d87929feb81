"""Sensitivity scans: per dependency group (or weight tensor) and ratio, the drop when only it
is pruned. ``sensitivity`` runs a scan with a strategy from ``STRATEGIES`` (exact and Taylor
here; Ray registers from :mod:`studio.core.cluster`), ``masks`` says which channels or weights
a ratio removes.

May import: models and the shared modules.
"""
