"""Reduced reproduction of the oneDNN fault behind issue 16 (run as a script, in a subprocess).

A convolution net with the channel counts structured pruning leaves (not multiples of 16),
trained with SGD on several threads, with the input batch in the standard (NCHW) layout or with
channels-last strides (NHWC). On AVX-512/AMX CPUs the NHWC run was reported to end with SIGSEGV
or "double free or corruption" inside ``loss.backward()``; the NCHW run finishes. On AVX2 CPUs
both finish. It prints the oneDNN convolution implementations it ran (``ONEDNN_VERBOSE=1``
lines are read from its own output by the test) and ``done`` at the end.

    python tests/core/onednn_nhwc_repro.py nhwc|nchw [steps] [threads]
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 11, 3, 1, 1), nn.BatchNorm2d(11), nn.ReLU(),
        nn.Conv2d(11, 11, 3, 1, 1), nn.BatchNorm2d(11), nn.ReLU(),
        nn.Conv2d(11, 23, 3, 2, 1), nn.BatchNorm2d(23), nn.ReLU(),
        nn.Conv2d(23, 45, 3, 2, 1), nn.BatchNorm2d(45), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(45, 10),
    )  # fmt: skip


def main() -> None:
    layout = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    model = net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(64, 1, 32, 32, generator=gen)
        if layout == "nhwc":  # what the old shift augmentation returned
            x = x.reshape(64, 32, 32, 1).permute(0, 3, 1, 2)
            assert x.stride()[1] == 1
        y = torch.randint(0, 10, (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("done", float(loss.detach()), flush=True)


if __name__ == "__main__":
    main()
