"""Pruning plans: the plan value and its recipe files, exact costs (parameters, MACs), allocation
to a target (uniform, global, sensitivity; latency through a cost function the caller passes),
importance criteria, predicted drops.

May import: scan, models and the shared modules.
"""
