"""Models and data: loading (demo, zoo, torch, TorchScript, .pt2, ONNX import and export
through ONNX Runtime), data sets, the layer inventory and dependency graph, evaluation,
activation and weight statistics, residual blocks, pruned files, tensor layouts.

The lowest stage: imports only the shared core modules (errors, jobs, files, paths).
"""

# imported with the package so that every process that unpickles an ONNX import knows how
from studio.core.models import onnx_converters as _onnx_converters  # noqa: E402, F401
