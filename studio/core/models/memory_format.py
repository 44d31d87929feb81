"""The memory layout of the tensors a gradient pass feeds a model.

PyTorch picks a convolution's kernel from its input's strides: an image batch whose strides are
those of ``torch.channels_last`` (NHWC) runs every convolution after it through oneDNN's NHWC
(``acdb``) brgemm kernels, forward and backward; a standard (NCHW) batch runs the blocked
(``aBcd8b``/``aBcd16b``) JIT kernels. A batch with one channel is *both* contiguous and
channels-last by PyTorch's test, so ``.contiguous()`` leaves channels-last strides in place.

On AVX-512/AMX CPUs, oneDNN's NHWC backward kernels crash (SIGSEGV, or glibc's "double free or
corruption") when a convolution's channel counts are not multiples of the 16-channel SIMD block
and several threads run it: what structured pruning leaves (11/23/45 channels on the demo
at half the MACs). Issue 16 traced the studio's fine-tuning crash to that: the shift
augmentation returned one-channel batches with channels-last strides, so the pruned model
trained in NHWC. Training now always feeds standard strides (:func:`standard_layout`), and the
Taylor pass uses NHWC only where every convolution's channels fill whole blocks
(:func:`nhwc_backward_safe`). ``tests/core/onednn_nhwc_repro.py`` is the reduced reproduction.
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN's widest f32 block (AVX-512: 16 floats); channel counts that are multiples of it
# take no tail path in the NHWC kernels
NHWC_SAFE_BLOCK = 16


def standard_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a freshly allocated (C-order) tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(1, size)
    return tuple(reversed(strides))


def standard_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the standard NCHW strides: itself when it has them, else a copy (also when
    PyTorch calls it contiguous, as it does a one-channel batch with channels-last strides)."""
    if x.dim() != 4 or tuple(x.stride()) == standard_strides(tuple(x.shape)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a convolution would run ``x`` in NHWC: it has channels-last strides and not the
    standard ones."""
    return (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and tuple(x.stride()) != standard_strides(tuple(x.shape))
    )


def nhwc_backward_safe(module: nn.Module) -> bool:
    """Whether every convolution of ``module`` has input and output channels (per group) that
    are multiples of :data:`NHWC_SAFE_BLOCK`, so a backward pass in NHWC takes no tail path."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            per_group = (m.in_channels // m.groups, m.out_channels // m.groups)
            depthwise = m.groups == m.in_channels and m.groups > 1
            counts = (m.in_channels,) if depthwise else per_group
            if any(c % NHWC_SAFE_BLOCK for c in counts if c > 3):
                return False
    return True
