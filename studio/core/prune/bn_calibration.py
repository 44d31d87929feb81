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


FOLDED_SAMPLES = 256
FOLDED_ELEMENTS = 20_000_000  # input elements in the one batch (a 224x224 image: 133 samples)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def folded_samples(data: DataSet) -> int:
    """How many of ``data``'s inputs :func:`match_statistics` runs in its one batch."""
    per_sample = max(1, int(data.x[0].numel())) if len(data) else 1
    return min(len(data), FOLDED_SAMPLES, max(16, FOLDED_ELEMENTS // per_sample))


def match_statistics(
    original: nn.Module,
    pruned: nn.Module,
    kept: dict[str, list[int]],
    data: DataSet,
    skip: set[str] | None = None,
    cancel: CancelToken | None = None,
) -> int:
    """Re-estimating batch norms for a model whose batch norms were folded into its
    convolutions (as ONNX exporters do): each convolution of ``pruned`` is given, on ``data``,
    the per-channel mean and standard deviation its channels have in ``original``.

    A folded batch norm is a per-channel scale and shift of the convolution's output, chosen so
    that the output has the norm's mean and deviation on the training data; after pruning, the
    pruned model's own statistics no longer match them, exactly as a kept batch norm's running
    statistics would not. Rescaling each channel to the unpruned model's statistics is what
    re-estimating that batch norm and then applying its affine transform does. One pass over
    one batch of up to ``FOLDED_SAMPLES`` inputs: each convolution is corrected as the pass
    reaches it, so the ones after it see corrected inputs. ``kept[name]`` lists which of the
    original output channels a convolution kept (all, when it is not listed); convolutions in
    ``skip`` (the model's output layers) are left as they are. Returns how many were corrected.
    """
    skip = skip or set()
    x = data.x[: folded_samples(data)]
    if len(x) < 2:
        return 0
    convs = {n: m for n, m in pruned.named_modules() if isinstance(m, _CONVS) and n not in skip}
    originals = dict(original.named_modules())
    convs = {n: m for n, m in convs.items() if isinstance(originals.get(n), _CONVS)}
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def channel_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = out.detach().transpose(0, 1).reshape(out.shape[1], -1).double()
        return flat.mean(1), flat.std(1)

    def measure(name: str):  # type: ignore[no-untyped-def]
        def hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
            targets[name] = channel_stats(out)

        return hook

    corrected: list[str] = []

    def correct(name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
            if name in corrected:  # a layer run twice is corrected once
                return out
            if out[0, 0].numel() == 1:  # squeeze-excite's 1x1 maps: never batch-normed
                return out
            mean, std = channel_stats(out)
            want_mean, want_std = targets[name]
            idx = kept.get(name, list(range(len(want_mean))))
            if len(idx) != len(mean):
                return out  # channels the record does not account for: leave it
            want_mean, want_std = want_mean[idx], want_std[idx]
            scale = torch.where(std > 1e-6, want_std / std.clamp_min(1e-12), torch.ones_like(std))
            shift = want_mean - mean * scale
            with torch.no_grad():
                mod.weight.mul_(scale.to(mod.weight.dtype).view(-1, *[1] * (mod.weight.dim() - 1)))
                if mod.bias is None:
                    mod.bias = nn.Parameter(torch.zeros(len(scale), dtype=mod.weight.dtype))
                mod.bias.mul_(scale.to(mod.bias.dtype)).add_(shift.to(mod.bias.dtype))
            corrected.append(name)
            view = (1, -1, *[1] * (out.dim() - 2))
            return out * scale.to(out.dtype).view(view) + shift.to(out.dtype).view(view)

        return hook

    device = next((p.device for p in pruned.parameters()), torch.device("cpu"))
    handles = [originals[n].register_forward_hook(measure(n)) for n in convs]
    try:
        with torch.no_grad():
            check(cancel)
            original.to(device)(x.to(device))
    finally:
        for h in handles:
            h.remove()
    handles = [m.register_forward_hook(correct(n)) for n, m in convs.items() if n in targets]
    try:
        with torch.no_grad():
            check(cancel)
            pruned(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return len(set(corrected))
