"""A corpus of real-world architectures, built and exported to ONNX by the project's own code.

Users bring ONNX files that other projects export: detectors, squeeze-excite classifiers,
segmenters, CNN-attention recognisers. Nothing may be downloaded, so the patterns those files
hold are rebuilt here in torch and exported as their exporters write them:

- ``yolo``: a YOLOv8-style detector (C2f blocks with Split and Concat, SPPF max-pool pyramid,
  an upsample-and-concat neck, a DFL head with Reshape/Transpose/Softmax); dynamic batch,
  height and width.
- ``mobilenetv3``: a MobileNetV3-style classifier (depthwise chains, squeeze-excite with
  hard-sigmoid, hard-swish), exported at opset 11 with its weights held in Constant nodes, as
  Paddle2ONNX writes them.
- ``efficientnet``: an EfficientNet-style MBConv stack (SiLU, squeeze-excite with sigmoid).
- ``unet``: a UNet-style segmenter (skip concats, transposed-conv upsampling); dynamic
  height and width.
- ``recogniser``: a text recogniser: a CNN stem, then pre-norm attention blocks (LayerNorm,
  separate q/k/v projections, GELU MLP) over the width; dynamic batch and width.

The weights are random but seeded: the corpus tests what loads, prunes and exports, not what
the models know. :func:`export` writes one file; :func:`synthetic_input` gives the data they
are compared on.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn
from torch.nn import functional as F

from studio.core.files import write_atomic


def _conv(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: type = nn.SiLU):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


# --- YOLOv8-style detector -----------------------------------------------------------------


class _Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2 = _conv(c, c, 3), _conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = _conv(cin, 2 * self.c)
        self.cv2 = _conv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(_Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class _SPPF(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 5) -> None:
        super().__init__()
        self.cv1 = _conv(cin, cin // 2)
        self.cv2 = _conv(cin // 2 * 4, cout)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class _DFL(nn.Module):
    """Distribution focal loss decoding: a softmax over ``bins`` and a fixed 1x1 conv."""

    def __init__(self, bins: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        x = x.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)
        return self.conv(x).view(b, 4, a)


class YoloStyle(nn.Module):
    def __init__(self, classes: int = 8, w: int = 16, bins: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, w, 3, 2), _conv(w, 2 * w, 3, 2), _C2f(2 * w, 2 * w))
        self.p3 = nn.Sequential(_conv(2 * w, 4 * w, 3, 2), _C2f(4 * w, 4 * w, 2))
        self.p4 = nn.Sequential(_conv(4 * w, 8 * w, 3, 2), _C2f(8 * w, 8 * w), _SPPF(8 * w, 8 * w))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.n3 = _C2f(12 * w, 4 * w, shortcut=False)
        self.down = _conv(4 * w, 4 * w, 3, 2)
        self.n4 = _C2f(12 * w, 8 * w, shortcut=False)
        self.bins, self.classes = bins, classes
        self.box = nn.ModuleList(
            nn.Sequential(_conv(c, 2 * w, 3), _conv(2 * w, 2 * w, 3), nn.Conv2d(2 * w, 4 * bins, 1))
            for c in (4 * w, 8 * w)
        )
        self.cls = nn.ModuleList(
            nn.Sequential(_conv(c, 2 * w, 3), _conv(2 * w, 2 * w, 3), nn.Conv2d(2 * w, classes, 1))
            for c in (4 * w, 8 * w)
        )
        self.dfl = _DFL(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        n3 = self.n3(torch.cat([self.up(p4), p3], 1))
        n4 = self.n4(torch.cat([self.down(n3), p4], 1))
        b = x.shape[0]
        outs = [
            torch.cat([box(f), cls(f)], 1).view(b, 4 * self.bins + self.classes, -1)
            for f, box, cls in zip((n3, n4), self.box, self.cls, strict=True)
        ]
        y = torch.cat(outs, 2)
        box, cls = y.split((4 * self.bins, self.classes), 1)
        return torch.cat([self.dfl(box), cls.sigmoid()], 1)


# --- MobileNetV3-style and EfficientNet-style classifiers ----------------------------------


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, gate: type = nn.Hardsigmoid, act=nn.ReLU) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act = nn.Conv2d(c, squeeze, 1), act()
        self.fc2, self.gate = nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class _InvertedResidual(nn.Module):
    def __init__(
        self, cin: int, hidden: int, cout: int, k: int, s: int, se: bool, act: type
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [] if hidden == cin else [_conv(cin, hidden, 1, act=act)]
        layers.append(_conv(hidden, hidden, k, s, groups=hidden, act=act))
        if se:
            squeeze = max(8, hidden // 4)
            if act is nn.SiLU:
                layers.append(_SqueezeExcite(hidden, squeeze, nn.Sigmoid, nn.SiLU))
            else:
                layers.append(_SqueezeExcite(hidden, squeeze))
        layers.append(nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)))
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Style(nn.Module):
    # (kernel, hidden, out, squeeze-excite, hard-swish, stride), as MobileNetV3-Small
    SETTINGS = (
        (3, 16, 16, True, False, 2),
        (3, 72, 24, False, False, 2),
        (3, 88, 24, False, False, 1),
        (5, 96, 40, True, True, 2),
        (5, 240, 40, True, True, 1),
        (5, 120, 48, True, True, 1),
        (5, 288, 96, True, True, 2),
        (5, 576, 96, True, True, 1),
    )

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(3, 16, 3, 2, act=nn.Hardswish)]
        cin = 16
        for k, hidden, cout, se, hs, s in self.SETTINGS:
            act = nn.Hardswish if hs else nn.ReLU
            layers.append(_InvertedResidual(cin, hidden, cout, k, s, se, act))
            cin = cout
        layers.append(_conv(cin, 576, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 256), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(256, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class EfficientNetStyle(nn.Module):
    # (expansion, out, repeats, stride, kernel), EfficientNet-B0's first stages, narrowed
    SETTINGS = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 2, 2, 3))

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(3, 32, 3, 2)]
        cin = 32
        for e, cout, repeats, stride, k in self.SETTINGS:
            for i in range(repeats):
                s = stride if i == 0 else 1
                layers.append(_InvertedResidual(cin, cin * e, cout, k, s, True, nn.SiLU))
                cin = cout
        layers.append(_conv(cin, 320, 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(320, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --- UNet-style segmenter -------------------------------------------------------------------


def _double(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(_conv(cin, cout, 3, act=nn.ReLU), _conv(cout, cout, 3, act=nn.ReLU))


class UNetStyle(nn.Module):
    def __init__(self, classes: int = 3, w: int = 16) -> None:
        super().__init__()
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.downs = nn.ModuleList()
        cin = 3
        for c in widths:
            self.downs.append(_double(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.merges = nn.ModuleList()
        for c in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(cin, c, 2, 2))
            self.merges.append(_double(2 * c, c))
            cin = c
        self.out = nn.Conv2d(cin, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.ups, self.merges, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], 1))
        return self.out(x)


# --- CNN + attention text recogniser --------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scale = q.shape[-1] ** -0.5
        attn = (q @ k.transpose(-2, -1) * scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Recogniser(nn.Module):
    def __init__(self, classes: int = 40, dim: int = 96, heads: int = 4, depth: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv(3, 32, 3, 2, act=nn.ReLU),
            _conv(32, 64, 3, (2, 1), act=nn.ReLU),
            _conv(64, dim, 3, (2, 2), act=nn.ReLU),
        )
        self.blocks = nn.Sequential(*(_Block(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)  # (b, dim, h, w)
        f = f.mean(2)  # (b, dim, w): the height pooled away
        seq = f.transpose(1, 2)  # (b, w, dim)
        return self.head(self.norm(self.blocks(seq)))


# --- the corpus -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusModel:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # batch 1
    input_name: str
    output_name: str
    dynamic: dict[str, dict[int, str]]
    opset: int = 18
    constants_as_nodes: bool = False  # Paddle2ONNX-style: weights in Constant nodes


MODELS: dict[str, CorpusModel] = {
    m.name: m
    for m in (
        CorpusModel(
            "yolo",
            YoloStyle,
            (1, 3, 64, 64),
            "images",
            "output0",
            {
                "images": {0: "batch", 2: "height", 3: "width"},
                "output0": {0: "batch", 2: "anchors"},
            },
        ),
        CorpusModel(
            "mobilenetv3",
            MobileNetV3Style,
            (1, 3, 64, 64),
            "x",
            "save_infer_model/scale_0.tmp_1",
            {"x": {0: "batch"}, "save_infer_model/scale_0.tmp_1": {0: "batch"}},
            opset=11,
            constants_as_nodes=True,
        ),
        CorpusModel(
            "efficientnet",
            EfficientNetStyle,
            (1, 3, 64, 64),
            "input",
            "logits",
            {"input": {0: "batch"}, "logits": {0: "batch"}},
        ),
        CorpusModel(
            "unet",
            UNetStyle,
            (1, 3, 64, 64),
            "image",
            "mask",
            {"image": {0: "batch", 2: "h", 3: "w"}, "mask": {0: "batch", 2: "h", 3: "w"}},
        ),
        CorpusModel(
            "recogniser",
            Recogniser,
            (1, 3, 32, 128),
            "x",
            "logits",
            {"x": {0: "batch", 3: "width"}, "logits": {0: "batch", 1: "steps"}},
            opset=17,
        ),
    )
}
NAMES = tuple(MODELS)


def build(name: str, seed: int = 0) -> nn.Module:
    """The corpus model ``name`` in eval mode, with seeded weights and batch-norm statistics
    that are not the identity (so that folding and pruning them is tested)."""
    spec = MODELS[name]
    torch.manual_seed(seed)
    module = spec.build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                mod.weight.copy_(0.5 + torch.rand(n, generator=generator))
                mod.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return module.eval()


def onnx_model(name: str, seed: int = 0, module: nn.Module | None = None) -> onnx.ModelProto:
    """Corpus model ``name`` (seeded random weights, or ``module``: the same architecture
    trained) exported by torch.onnx (TorchScript exporter) with its dynamic axes, at its
    opset; the Paddle-style one with its weights moved into Constant nodes."""
    spec = MODELS[name]
    module = (build(name, seed) if module is None else module).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (synthetic_input(name, 1, seed),),
            buffer,
            dynamo=False,
            opset_version=spec.opset,
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            dynamic_axes=spec.dynamic,
        )
    model = onnx.load_from_string(buffer.getvalue())
    if spec.constants_as_nodes:
        model = _constants_as_nodes(model)
    onnx.checker.check_model(model)
    return model


def export(name: str, path: str | Path, seed: int = 0, module: nn.Module | None = None) -> Path:
    """Write corpus model ``name`` (or ``module``, trained) as an ONNX file at ``path``."""
    path = Path(path)
    write_atomic(path, onnx_model(name, seed, module).SerializeToString())
    return path


def synthetic_input(name: str, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs the corpus models are compared on: smooth random images (low-frequency noise,
    as natural images are), so that pruning is judged on structured input, not white noise."""
    spec = MODELS[name]
    generator = torch.Generator().manual_seed(1000 + seed)
    _, c, h, w = spec.input_shape
    coarse = torch.randn(batch, c, max(2, h // 8), max(2, w // 8), generator=generator)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _constants_as_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every initializer held in a Constant node instead (as Paddle2ONNX
    writes weights)."""
    constants = [
        helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer
    ]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def output_agreement(reference: np.ndarray, pruned: np.ndarray) -> float:
    """Cosine similarity of two output batches, flattened per sample, averaged."""
    a = reference.reshape(reference.shape[0], -1).astype(np.float64)
    b = pruned.reshape(pruned.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))
