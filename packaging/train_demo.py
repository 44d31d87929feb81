"""Train the bundled demo network: ResNet-20 on the digits train split.

Writes the state_dict to resources/demo_resnet20_digits.pt (atomically) and prints the
validation accuracy after every epoch. Deterministic for a given seed and thread count;
takes a few minutes on 2 CPU cores.

    python packaging/train_demo.py [--epochs 30] [--out resources/demo_resnet20_digits.pt]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from studio.core.models import zoo
from studio.core.models.data import DEMO_MEAN, DEMO_STD, DataSet, demo_splits
from studio.core.paths import DEMO_WEIGHTS

SHIFT = 2  # pixels of random translation in each direction
BACKGROUND = (0.0 - DEMO_MEAN) / DEMO_STD  # a blank pixel after normalisation


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels (pad with background, then crop)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=BACKGROUND)
    dy = torch.randint(0, 2 * shift + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: DataSet, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on a labelled data set."""
    assert data.y is not None
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.x[start : start + batch_size])
        correct += int((logits.argmax(1) == data.y[start : start + batch_size]).sum())
    return correct / len(data)


def train(epochs: int, batch_size: int, lr: float, seed: int) -> tuple[torch.nn.Module, float]:
    """Train ResNet-20 with SGD + cosine schedule; return the model and its val accuracy."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_set, val_set = demo_splits()
    assert train_set.y is not None
    model = zoo.build("resnet20", zoo.default_input_shape("resnet20"), num_classes=10)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = -(-len(train_set) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=lr,
        total_steps=epochs * steps_per_epoch,
        pct_start=0.15,
        anneal_strategy="cos",
        div_factor=10.0,
        final_div_factor=100.0,
    )
    val_acc = 0.0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_set), generator=gen)
        total_loss, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = random_shift(train_set.x[idx], SHIFT, gen)
            loss = F.cross_entropy(model(x), train_set.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
        val_acc = accuracy(model, val_set)
        print(
            f"epoch {epoch:3d}/{epochs}  loss {total_loss / seen:.4f}  "
            f"val acc {val_acc * 100:.2f}%  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return model.eval(), val_acc


def save_atomically(state: dict[str, torch.Tensor], out: Path) -> None:
    """Write to a temporary file beside ``out``, then rename it over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, val_acc = train(args.epochs, args.batch_size, args.lr, args.seed)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_atomically(state, args.out)
    minutes = (time.perf_counter() - start) / 60
    print(f"final val accuracy {val_acc * 100:.2f}% in {minutes:.1f} min; saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
