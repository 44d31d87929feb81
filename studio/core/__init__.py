"""Headless engine of Pruning Studio. Never imports Qt (enforced by tests/test_layers.py).

Stages, each a package that may import only the stages before it (and the shared modules):

    models -> scan -> plan -> prune -> latency -> train -> export -> cluster

- ``models``: loading (torch, TorchScript, .pt2, ONNX), the zoo, data, inventory, dependency
  graph, evaluation, activation and weight statistics, residual blocks, pruned files.
- ``scan``: sensitivity scans (naive, exact, Taylor); their strategies register with the scan.
- ``plan``: pruning plans, costs, allocation (given cost functions), importance, drops.
- ``prune``: the engine (structured, weights, blocks, BN re-estimation).
- ``latency``: measurement, lookup-table prediction, device profiles (measures pruned variants).
- ``train``: fine-tuning, distillation, gradual pruning, checkpoints.
- ``export``: writers, verification, INT8, report, Netron server.
- ``cluster``: Ray connection, remote scans and training.

Shared by all (import nothing above them): ``errors``, ``jobs``, ``files``, ``paths``,
``isolation``.
"""
