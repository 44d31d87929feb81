"""Pruning Studio: see, plan and apply pruning of neural networks."""

__version__ = "0.1.0"
