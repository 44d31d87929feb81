"""Re-estimating batch-norm statistics after pruning (no gradients, no weight changes).

Removing channels or weights shifts the distribution every later batch norm sees, while its
running mean and variance still describe the unpruned network; that mismatch, not the lost
weights alone, is why an unrecalibrated pruned network often falls to chance. Running the
data through the pruned network with the batch norms accumulating fresh statistics (a plain
average over batches) repairs it in seconds; it is the "adaptive BN" step of EagleEye
(Li et al., 2020) and what Torch-Pruning's examples do before fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from studio.core.jobs import CancelToken, ProgressFn, check, report
from studio.core.models.data import DataSet

MAX_SAMPLES = 2048
BATCH = 128


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recalibrate_bn(
    module: nn.Module,
    data: DataSet,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    max_samples: int = MAX_SAMPLES,
) -> int:
    """Replace the running statistics of every batch norm in ``module`` by those of the first
    ``max_samples`` inputs of ``data``; return how many samples were used (0: no batch norm)."""
    norms = batch_norms(module)
    if not norms or len(data) == 0:
        return 0
    n = min(len(data), max_samples)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    momenta = [m.momentum for m in norms]
    was_training = module.training
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        with torch.no_grad():
            for start in range(0, n, BATCH):
                check(cancel)
                batch = data.x[start : min(start + BATCH, n)]
                if len(batch) < 2 and start > 0:
                    break  # training-mode batch norm needs two samples; the rest suffices
                module(batch.to(device))
                report(progress, min(start + BATCH, n) / n, "re-estimating batch-norm statistics")
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.train(was_training)
    return n
