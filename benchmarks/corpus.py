"""Real-world architectures, as a new user would prune them: figures per corpus model.

Each model of :mod:`studio.core.models.corpus` (YOLOv8-, MobileNetV3-, EfficientNet-,
UNet-style, CNN+attention recogniser) is first trained for a few epochs on a task made from the
bundled digits (random weights give outputs that hardly depend on the input, so no fidelity
figure would mean anything): classes for the classifiers, stroke masks for the segmenter, four
digits in a row for the recogniser, a digit placed on a canvas for the detector. It is exported
by torch.onnx and run through the CLI as a user would: ``studio info`` (timed), and ``studio
prune --model F.onnx --data calibration.npz --target-macs T --out pruned.onnx`` with nothing
else set (the input shape comes from the data; sensitivity allocation on runtime channel
counts; the classifiers' data is labelled, the others' is not). Printed per model:

- parameters and MACs before and after, the groups pruned and those rolled back or left whole
  (with the reasons);
- ONNX Runtime quiet latency of the original file and the pruned file (1 thread, batch 1,
  interleaved passes; quiet = the fastest pass's median) next to the MAC ratio;
- beside the default, the same target allocated uniformly (``--allocate uniform``);
- before fine-tuning, on held-out inputs of the task: the task's accuracy of the original and
  of the pruned file, the cosine of their outputs (plain, and centred on the batch mean) and
  top-1 agreement (classifiers per image, the recogniser per step, the segmenter per pixel,
  the detector's class scores per anchor).

    python benchmarks/corpus.py [--models yolo,unet] [--target-macs 0.7] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.core.models import corpus, onnx_io  # noqa: E402

STUDIO = [sys.executable, "-m", "studio"]


def studio(*args: str) -> tuple[dict, float, str]:
    started = time.perf_counter()
    out = subprocess.run([*STUDIO, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["(no message)"]
        return {"_error": lines[-1]}, seconds, out.stdout
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), seconds, out.stdout


def quiet_ms(paths: list[Path], x: np.ndarray, seconds: float) -> list[float]:
    """Each file's quiet latency: interleaved passes of ``onnx_io.latencies_ms`` (blocks of
    runs alternating between the files) for ``seconds``; the fastest pass's median."""
    sessions = [onnx_io.session(str(p), threads=1) for p in paths]
    best = [float("inf")] * len(paths)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for i, ms in enumerate(onnx_io.latencies_ms(sessions, x, budget_s=0.5)):
            best[i] = min(best[i], ms)
    return best


def fidelity(name: str, want: np.ndarray, got: np.ndarray) -> str:
    """Cosine of the outputs (as the studio reports it), the same of the outputs centred on
    their mean (a plain cosine is near 1 for any outputs with a large common offset, as a
    detector's box distances have), and top-1 agreement."""
    cosine = corpus.output_agreement(want, got)
    centred = corpus.output_agreement(want - want.mean(0), got - got.mean(0))
    if name in ("mobilenetv3", "efficientnet", "unet"):  # classes on axis 1
        top1 = float(np.mean(want.argmax(1) == got.argmax(1)))
    elif name == "recogniser":  # (batch, steps, classes)
        top1 = float(np.mean(want.argmax(-1) == got.argmax(-1)))
    else:  # yolo: 4 box sides, then the class scores, per anchor
        top1 = float(np.mean(want[:, 4:].argmax(1) == got[:, 4:].argmax(1)))
    return f"cosine {cosine:.3f}, centred cosine {centred:.3f}, top-1 agreement {top1:.3f}"


# --- tasks made from the digits, so that the corpus models know something -------------------


def task(name: str, split: str, n: int | None = None, seed: int = 0) -> tuple:
    """(inputs, targets) of a task built from the bundled digits (32x32, normalised) for
    corpus model ``name``: classes for the classifiers; per-pixel classes for the segmenter
    (background, stroke of a digit below 5, stroke of one from 5); four digits side by side,
    one class per output step, for the recogniser; a digit 0-7 placed at random on a 64x64
    canvas for the detector (class scores per anchor, box sides in stride units)."""
    import torch
    from torch.nn import functional as F

    from studio.core.models.data import demo_splits

    data = demo_splits()[0 if split == "train" else 1]
    x, y = data.x, data.y
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 99))
    if name in ("mobilenetv3", "efficientnet", "unet"):
        img = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False).repeat(
            1, 3, 1, 1
        )
        if name != "unet":
            return img[:n], y[:n]
        stroke = img[:, 0] > img[:, 0].mean() + 0.5 * img[:, 0].std()
        mask = stroke.long() * (1 + (y >= 5).long()).view(-1, 1, 1)
        return img[:n], mask[:n]
    count = n or len(y)
    if name == "recogniser":
        pick = torch.randint(0, len(y), (count, 4), generator=g)
        img = torch.cat([x[pick[:, k]] for k in range(4)], dim=3).repeat(1, 3, 1, 1)
        steps = y[pick].repeat_interleave(8, dim=1)  # 32 steps, 8 per digit
        return img, steps
    keep = torch.nonzero(y < 8).flatten()
    pick = keep[torch.randint(0, len(keep), (count,), generator=g)]
    canvas = torch.full((count, 3, 64, 64), float(x.min()))
    corner = torch.randint(0, 33, (count, 2), generator=g)
    for i in range(count):
        top, left = int(corner[i, 0]), int(corner[i, 1])
        canvas[i, :, top : top + 32, left : left + 32] = x[pick[i], 0]
    return canvas, torch.cat([y[pick].view(-1, 1).float(), corner.float()], 1)


def _anchors() -> tuple:
    import torch

    centres, strides = [], []
    for size, stride in ((8, 8), (4, 16)):
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        centres.append(torch.stack([xs.flatten(), ys.flatten()], 1).float() * stride + stride / 2)
        strides.append(torch.full((size * size,), float(stride)))
    return torch.cat(centres), torch.cat(strides)


def task_loss(name: str, out, target):
    import torch
    from torch.nn import functional as F

    if name in ("mobilenetv3", "efficientnet", "unet"):
        return F.cross_entropy(out, target)
    if name == "recogniser":
        return F.cross_entropy(out[..., :10].transpose(1, 2), target)
    centres, strides = _anchors()  # detector: digit box, 32x32 from the corner
    top, left = target[:, 1:2], target[:, 2:3]
    cx, cy = centres[:, 0].view(1, -1), centres[:, 1].view(1, -1)
    inside = (cx > left) & (cx < left + 32) & (cy > top) & (cy < top + 32)
    classes = torch.zeros_like(out[:, 4:])
    rows = torch.arange(len(target))
    classes[rows, target[:, 0].long()] = inside.float()
    loss = F.binary_cross_entropy(out[:, 4:].clamp(1e-6, 1 - 1e-6), classes)
    sides = torch.stack([cx - left, cy - top, left + 32 - cx, top + 32 - cy], 1) / strides
    return (
        loss + (F.l1_loss(out[:, :4], sides.clamp(0, 7), reduction="none") * inside[:, None]).mean()
    )


def task_score(name: str, out, target) -> float:
    """Accuracy on the task: per image, per pixel, per step, or per anchor inside the digit."""
    if name in ("mobilenetv3", "efficientnet", "unet"):
        return float((out.argmax(1) == target).float().mean())
    if name == "recogniser":
        return float((out[..., :10].argmax(-1) == target).float().mean())
    centres, _ = _anchors()
    top, left = target[:, 1:2], target[:, 2:3]
    cx, cy = centres[:, 0].view(1, -1), centres[:, 1].view(1, -1)
    inside = (cx > left) & (cx < left + 32) & (cy > top) & (cy < top + 32)
    right = out[:, 4:].argmax(1) == target[:, :1].long()
    return float(right[inside].float().mean())


def trained(name: str, epochs: int) -> tuple:
    """Corpus model ``name`` trained on its digits task (Adam, batch 64, seeded); returns the
    module and its validation score."""
    import torch

    torch.manual_seed(0)
    module = corpus.build(name).train()
    x, t = task(name, "train", n=None if name != "recogniser" else 2000)
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(_))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            task_loss(name, module(x[idx]), t[idx]).backward()
            opt.step()
    module.eval()
    vx, vt = task(name, "val")
    with torch.no_grad():
        score = task_score(name, module(vx), vt)
    return module, score


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(corpus.NAMES))
    parser.add_argument("--target-macs", default="0.7")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="corpus-"))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                       if ln.startswith("Model name")), "?")  # fmt: skip
    flags = next((ln for ln in cpu.splitlines() if ln.startswith("Flags")), "")
    simd = [f for f in ("avx2", "avx512f", "amx_tile") if f" {f}" in flags]
    print(f"CPU: {model_name} ({', '.join(simd)}); target {args.target_macs} of the MACs")
    for name in args.models.split(","):
        spec = corpus.MODELS[name]
        began = time.perf_counter()
        module, score = trained(name, args.epochs)
        source = corpus.export(name, folder / f"{name}.onnx", module=module)
        calib_x, calib_t = task(name, "train", n=512, seed=1)
        data = folder / f"{name}-calibration.npz"
        if name in ("mobilenetv3", "efficientnet"):  # labelled: the scan measures accuracy
            np.savez(data, x=calib_x.numpy(), y=calib_t.numpy())
        else:  # dense outputs: the scan measures fidelity to the unpruned model
            np.savez(data, x=calib_x.numpy())
        info, info_s, _ = studio("info", "--model", str(source), "--input-shape",
                                 ",".join(map(str, spec.input_shape)), "--json")  # fmt: skip
        out = folder / f"{name}-pruned.onnx"
        summary, prune_s, _ = studio(
            "prune", "--model", str(source), "--data", str(data), "--target-macs",
            args.target_macs, "--out", str(out), "--json", "--no-speed-check",
        )  # fmt: skip
        print(f"\n{name}: opset {spec.opset}, dynamic {spec.dynamic[spec.input_name]}; "
              f"trained {args.epochs} epochs on its digits task in "
              f"{time.perf_counter() - began - info_s - prune_s:.0f}s (validation {score:.3f}); "
              f"info {info_s:.1f}s ({len(info.get('groups', []))} groups); "
              f"prune {prune_s:.1f}s")  # fmt: skip
        if "_error" in summary:
            print(f"  prune failed: {summary['_error']}")
            continue
        params = (summary["params_before"], summary["params_after"])
        macs = (summary["macs_before"], summary["macs_after"])
        print(f"  parameters {params[0]:,} -> {params[1]:,} ({params[1] / params[0]:.3f}); "
              f"MACs {macs[0]:,} -> {macs[1]:,} ({macs[1] / macs[0]:.3f})")  # fmt: skip
        print(f"  groups pruned {summary['targets']} of {len(info.get('groups', []))}; "
              f"rolled back or left whole {len(summary['skipped'])}")  # fmt: skip
        for item in summary["skipped"]:
            print(f"    {item['layer']}: {item['reason']}")
        vx, vt = task(name, "val", n=256)  # held out from training and from the scan
        want = onnx_io.run(onnx_io.session(str(source)), vx.numpy())[0]
        got = onnx_io.run(onnx_io.session(str(out)), vx.numpy())[0]
        before = task_score(name, torch.from_numpy(want), vt)
        after = task_score(name, torch.from_numpy(got), vt)
        print(f"  before fine-tuning: task accuracy {before:.3f} -> {after:.3f}; "
              f"{fidelity(name, want, got)}")  # fmt: skip
        # beside it, the same target allocated uniformly (no scan)
        flat: Path | None = folder / f"{name}-uniform.onnx"
        uniform, _, _ = studio(
            "prune", "--model", str(source), "--data", str(data), "--target-macs",
            args.target_macs, "--allocate", "uniform", "--out", str(flat), "--json",
            "--no-speed-check",
        )  # fmt: skip
        if "_error" in uniform:
            print(f"  uniform allocation failed: {uniform['_error']}")
            flat = None
        else:
            got = onnx_io.run(onnx_io.session(str(flat)), vx.numpy())[0]
            flat_macs = uniform["macs_after"] / uniform["macs_before"]
            print(f"  uniform allocation (MACs {flat_macs:.3f}): task accuracy "
                  f"{task_score(name, torch.from_numpy(got), vt):.3f}; "
                  f"{fidelity(name, want, got)}")  # fmt: skip
        files = [source, out] + ([flat] if flat else [])
        times = quiet_ms(files, vx[:1].numpy(), args.seconds)
        speedup, ratio = times[0] / times[1], macs[0] / macs[1]
        print(f"  ONNX Runtime quiet, 1 thread, batch 1: {times[0]:.3f} -> {times[1]:.3f} ms: "
              f"{speedup:.2f}x faster, MAC ratio {ratio:.2f}x, share {speedup / ratio:.2f}"
              + (f"; uniform {times[0] / times[2]:.2f}x" if flat else ""))  # fmt: skip


if __name__ == "__main__":
    main()
