"""The pruning engine: applies a plan to a copy of a model (structured through Torch-Pruning's
dependency graph, unstructured and N:M weights, whole blocks) and re-estimates batch norms.

May import: plan, scan, models and the shared modules.
"""
