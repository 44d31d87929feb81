"""Built-in architectures, defined here so the studio needs no torchvision.

Each is built by name with random weights for a (B, C, H, W) input shape. They are small
versions sized for 32x32 inputs (the bundled digits are (N, 1, 32, 32), 10 classes) and are
written so that Torch-Pruning can trace them: one module per operation (no reused or in-place
activations), 1x1 conv shortcuts on every residual add that changes shape, and attention in the
timm layout (``qkv``/``proj`` linears and a ``num_heads`` attribute).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import nn

from studio.core.errors import StudioError

NAMES: tuple[str, ...] = ("resnet20", "resnet56", "vgg11", "mobilenetv2", "vit", "lstm")

_DEFAULT_SHAPE = (1, 1, 32, 32)
_VIT_PATCH = 4
_VGG11_CFG: tuple[int | str, ...] = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M")
# MobileNetV2 stages for 32x32 inputs: (expansion, out channels, blocks, first stride)
_MBV2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)


def default_input_shape(name: str) -> tuple[int, ...]:
    """The (B, C, H, W) input a freshly built ``name`` expects: 1-channel 32x32 for all."""
    _check_name(name)
    return _DEFAULT_SHAPE


def build(
    name: str, input_shape: tuple[int, ...] = _DEFAULT_SHAPE, num_classes: int = 10
) -> nn.Module:
    """Build architecture ``name`` with random weights for ``input_shape`` (B, C, H, W); the
    same weights every time (seeded, without touching the caller's random state), so that a
    zoo model's fingerprint, and what the caches keep under it, is the same in every run."""
    _check_name(name)
    try:
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise StudioError(
            f"{name} needs an input shape (batch, channels, height, width) of positive sizes, "
            f"got {input_shape}"
        )
    if num_classes <= 0:
        raise StudioError(f"number of classes must be positive, got {num_classes}")
    _, channels, height, width = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _BUILDERS[name](channels, height, width, num_classes)


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise StudioError(f"unknown architecture {name!r}: choose one of {', '.join(NAMES)}")


def _conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut where the shape changes (option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3)
        self.shortcut = (
            nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3 stages of ``n`` blocks at 16/32/64 channels."""

    def __init__(self, n: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, 16, 3)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    """VGG-11 with BN at reduced width; max-pools are dropped once the map is 1 pixel."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, h, w = in_channels, height, width
        for item in _VGG11_CFG:
            if item == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
            else:
                layers += [*_conv_bn(c_in, int(item), 3), nn.ReLU()]
                c_in = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(c_in, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, c_out, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """A short MobileNetV2 for 32x32 inputs: stride-1 stem, three stride-2 stages (to 4x4)."""

    def __init__(self, in_channels: int, num_classes: int, last_channels: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, 32, 3), nn.ReLU6()]
        c_in = 32
        for expansion, c_out, n, stride in _MBV2_CFG:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
        layers += [*_conv_bn(c_in, last_channels, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class Attention(nn.Module):
    """Multi-head self-attention in the timm layout (``qkv``, ``proj``, ``num_heads``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # head_dim is inferred (-1) so the block still runs after heads or head dims are pruned
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A small ViT: conv patch embedding, class token, learned position embedding."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        num_classes: int,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if height % _VIT_PATCH or width % _VIT_PATCH:
            raise StudioError(
                f"vit needs height and width divisible by its patch size {_VIT_PATCH}, "
                f"got {height}x{width}"
            )
        num_patches = (height // _VIT_PATCH) * (width // _VIT_PATCH)
        self.patch_embed = nn.Conv2d(in_channels, dim, _VIT_PATCH, _VIT_PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class LSTMClassifier(nn.Module):
    """Reads a (B, C, H, W) image as H steps of C*W features; classifies the last state."""

    def __init__(
        self, in_channels: int, width: int, num_classes: int, hidden: int = 128, layers: int = 1
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_channels * width, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(0, 2, 1, 3).flatten(2)  # (B, H, C*W)
        out, _ = self.lstm(seq)
        return self.fc(out[:, -1])


_BUILDERS: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    "resnet20": lambda c, h, w, k: CifarResNet(3, c, k),
    "resnet56": lambda c, h, w, k: CifarResNet(9, c, k),
    "vgg11": lambda c, h, w, k: VGG(c, h, w, k),
    "mobilenetv2": lambda c, h, w, k: MobileNetV2(c, k),
    "vit": lambda c, h, w, k: VisionTransformer(c, h, w, k),
    "lstm": lambda c, h, w, k: LSTMClassifier(c, w, k),
}
