"""Export: writers (ONNX, TorchScript, PyTorch, .pt2), verification, INT8 quantization, the
report, and the local Netron server.

May import: train, latency, prune, plan, scan, models and the shared modules.
"""
