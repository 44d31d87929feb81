"""Latency: measurement in ONNX Runtime and PyTorch, the per-layer lookup-table prediction and
its per-model fit (which prunes and times variants), ONNX Runtime's layouts, device profiles
and their roofline estimate.

May import: prune, plan, scan, models and the shared modules.
"""
