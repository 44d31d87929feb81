"""Where a model is already sparse or weak: per-layer zeros and per-channel weight norms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ChannelNorms:
    """Norm and fraction of zero weights of each output channel of one layer."""

    layer: str
    norms: np.ndarray  # (out_channels,): small = weak channel
    sparsity: float  # fraction of exact zeros in the layer's whole weight
    zeros: np.ndarray  # (out_channels,): fraction of exact zeros in each channel's weights

    @property
    def dead(self) -> int:
        """Channels whose weights are all zero (already pruned in effect)."""
        return int((self.zeros >= 1.0).sum())


def channel_norms(module: nn.Module, p: int = 2) -> list[ChannelNorms]:
    """Per-output-channel L1 or L2 norms and zeros of every conv and linear layer, in model
    order."""
    result = []
    with torch.no_grad():
        for name, mod in module.named_modules():
            if isinstance(mod, WEIGHTED):
                w = mod.weight.detach().float().reshape(mod.weight.shape[0], -1)
                norms = w.abs().sum(1) if p == 1 else w.pow(2).sum(1).sqrt()
                zero = (w == 0).float()
                result.append(
                    ChannelNorms(
                        name,
                        norms.cpu().numpy(),
                        float(zero.mean()),
                        zero.mean(1).cpu().numpy(),
                    )
                )
    return result
