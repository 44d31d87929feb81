"""Where a model is already sparse or weak: per-layer zeros and per-channel weight norms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ChannelNorms:
    """Norm of each output channel's weights of one layer (small = weak channel)."""

    layer: str
    norms: np.ndarray  # (out_channels,)
    sparsity: float  # fraction of exact zeros in the layer's weight


def channel_norms(module: nn.Module, p: int = 2) -> list[ChannelNorms]:
    """Per-output-channel L1 or L2 norms of every conv and linear layer, in model order."""
    result = []
    with torch.no_grad():
        for name, mod in module.named_modules():
            if isinstance(mod, WEIGHTED):
                w = mod.weight.detach().float().reshape(mod.weight.shape[0], -1)
                norms = w.abs().sum(1) if p == 1 else w.pow(2).sum(1).sqrt()
                zeros = float((w == 0).float().mean())
                result.append(ChannelNorms(name, norms.cpu().numpy(), zeros))
    return result
