"""A zoo of small CNNs for legoc tests, written from the architectures' descriptions.

``MODELS[name]()`` returns ``(model, example_inputs)``: the model in eval mode (seeded, with
randomized BatchNorm statistics and affine parameters so BN is never the identity) and a tuple of
batch-1 example inputs. ``random_dag(seed, n_layers)`` builds a random DAG-shaped CNN.

Every model is ``torch.fx.symbolic_trace``-able and ``torch.export``-able, and uses only standard
operators (conv, bn, relu/relu6/hardswish/hardsigmoid/sigmoid/silu, add, mul, cat, chunk,
pools, flatten/view/reshape, permute, transpose, interpolate, Linear). ``count_macs`` gives a
rough multiply-accumulate count (conv + linear only).
"""
from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "random_dag", "count_macs"]


# ----------------------------------------------------------------------------- helpers


def _randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running stats and affine params (uses the global RNG)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n) * 0.1)
                m.running_var.copy_(torch.rand(n) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(n) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n) * 0.1)


def _build(seed: int, ctor: Callable[[], nn.Module], *shapes: tuple[int, ...]):
    torch.manual_seed(seed)
    model = ctor()
    _randomize_bn(model)
    model.eval()
    inputs = tuple(torch.randn(1, *s) for s in shapes)
    return model, inputs


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    """conv (no bias) -> BN -> activation (``act=None``: no activation)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def count_macs(model: nn.Module, inputs: tuple) -> int:
    """Rough MACs of one forward pass: Conv2d and Linear layers only."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


# ----------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            cbr(3, 16), cbr(16, 16), nn.MaxPool2d(2),
            cbr(16, 32), cbr(32, 32), nn.MaxPool2d(2),
            cbr(32, 64), cbr(64, 64), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ----------------------------------------------------------------------------- ResNet family


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBasic(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = cbr(3, 16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (optionally grouped: ResNeXt) -> 1x1 expand; projection shortcut if needed."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNetBottleneck(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = cbr(3, 16)
        self.blocks = nn.Sequential(
            Bottleneck(16, 8, 32),  # projection (16 -> 32)
            Bottleneck(32, 8, 32),  # identity
            Bottleneck(32, 16, 64, stride=2),  # strided projection
            Bottleneck(64, 16, 64),
            Bottleneck(64, 16, 64, stride=2),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut  # no post-activation


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(
            PreActBlock(16, 16), PreActBlock(16, 16),
            PreActBlock(16, 32, 2), PreActBlock(32, 32),
            PreActBlock(32, 64, 2),
        )
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layers(self.conv1(x))
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.fc(x.view(x.size(0), -1))


class ResNeXt(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = cbr(3, 16)
        self.blocks = nn.Sequential(
            Bottleneck(16, 16, 32, groups=4),  # cardinality 4, width 4 per group
            Bottleneck(32, 16, 32, groups=8),  # cardinality 8, width 2 per group
            Bottleneck(32, 32, 64, stride=2, groups=8),
            Bottleneck(64, 32, 64, groups=4),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(x.flatten(1))


# ----------------------------------------------------------------------------- MobileNets


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(cbr(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            cbr(hidden, cout, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            cbr(3, 16, act=nn.ReLU6),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 3),
            InvertedResidual(24, 24, 1, 2),
            InvertedResidual(24, 32, 2, 2),
            InvertedResidual(32, 32, 1, 2),
            InvertedResidual(32, 32, 1, 2),
            cbr(32, 64, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        squeeze = _make_divisible(c // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class MBV3Block(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int, se: bool, act: type):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(cbr(cin, hidden, 1, act=act))
        layers.append(cbr(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(cbr(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        if self.use_res:
            y = y + x
        return y


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        self.stem = cbr(3, 16, 3, 1, act=hs)
        self.blocks = nn.Sequential(
            MBV3Block(16, 16, 16, 3, 1, True, re),  # depthwise + SE, residual
            MBV3Block(16, 48, 24, 3, 2, False, re),
            MBV3Block(24, 48, 24, 3, 1, False, re),
            MBV3Block(24, 64, 40, 5, 2, True, hs),
            MBV3Block(40, 64, 40, 5, 1, True, hs),
        )
        self.last = cbr(40, 64, 1, act=hs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(64, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, num_classes)
        )

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


# ----------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: bool):
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        if bottleneck:  # DenseNet-BC: BN-ReLU-conv1x1(4k) first
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4 * growth, 1, bias=False)]
            c = 4 * growth
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, 1, 1, bias=False)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        new = self.layers(x)
        return torch.cat([x, new], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(F.relu(self.bn(x))))


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 10, growth: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        c = 16
        blocks: list[nn.Module] = []
        for i, n in enumerate((3, 3, 3)):
            for _ in range(n):
                blocks.append(DenseLayer(c, growth, bottleneck=(i == 1)))
                c += growth
            if i < 2:
                blocks.append(Transition(c, c // 2))
                c //= 2
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


# ----------------------------------------------------------------------------- Inception


class InceptionModule(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int, two_3x3: bool):
        super().__init__()
        self.b1 = cbr(cin, c1, 1)
        self.b2 = nn.Sequential(cbr(cin, c3r, 1), cbr(c3r, c3, 3))
        if two_3x3:
            self.b3 = nn.Sequential(cbr(cin, c5r, 1), cbr(c5r, c5, 3), cbr(c5, c5, 3))
        else:
            self.b3 = nn.Sequential(cbr(cin, c5r, 1), cbr(c5r, c5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2))  # 16x16
        self.inc1 = InceptionModule(16, 8, 8, 12, 4, 8, 4, two_3x3=False)  # -> 32
        self.inc2 = InceptionModule(32, 16, 16, 24, 8, 8, 8, two_3x3=True)  # -> 56
        self.pool = nn.MaxPool2d(3, 2, 1)  # 8x8
        self.inc3 = InceptionModule(56, 16, 16, 24, 8, 16, 8, two_3x3=False)  # -> 64
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.inc2(self.inc1(self.stem(x)))
        x = self.inc3(self.pool(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))


# ----------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                cbr(cin, cin, 3, stride, groups=cin, act=None),
                cbr(cin, branch, 1),
            )
            b2_in = cin
        else:
            assert cin == cout
            self.branch1 = None
            b2_in = branch
        self.branch2 = nn.Sequential(
            cbr(b2_in, branch, 1),
            cbr(branch, branch, 3, stride, groups=branch, act=None),
            cbr(branch, branch, 1),
        )

    def forward(self, x):
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = cbr(3, 16)  # 32x32
        self.stage2 = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))  # 16x16
        self.stage3 = nn.Sequential(ShuffleUnit(32, 64, 2), ShuffleUnit(64, 64, 1), ShuffleUnit(64, 64, 1))
        self.conv5 = cbr(64, 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.conv5(self.stage3(self.stage2(self.stem(x))))
        x = x.mean([2, 3])
        return self.fc(x)


# ----------------------------------------------------------------------------- U-Net


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(cbr(cin, cout), cbr(cout, cout))


class UNet(nn.Module):
    def __init__(self, out_channels: int = 1):
        super().__init__()
        self.enc1 = DoubleConv(3, 8)  # 32x32
        self.enc2 = DoubleConv(8, 16)  # 16x16
        self.enc3 = DoubleConv(16, 32)  # 8x8
        self.bottleneck = DoubleConv(32, 64)  # 4x4
        self.pool = nn.MaxPool2d(2)
        self.dec3 = DoubleConv(64 + 32, 32)
        self.dec2 = DoubleConv(32 + 16, 16)
        self.dec1 = DoubleConv(16 + 8, 8)
        self.head = nn.Conv2d(8, out_channels, 1)

    @staticmethod
    def _up(x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self._up(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self._up(d3), e2], dim=1))
        d1 = self.dec1(torch.cat([self._up(d2), e1], dim=1))
        return self.head(d1)


# ----------------------------------------------------------------------------- detection


class TinyDetector(nn.Module):
    """Backbone -> mini FPN over two levels -> classification and box-regression heads."""

    def __init__(self, num_classes: int = 4, num_anchors: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(cbr(3, 16, stride=2), cbr(16, 16))  # 16x16
        self.c4 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))  # 8x8
        self.c5 = BasicBlock(32, 64, 2)  # 4x4
        self.lat4 = nn.Conv2d(32, 32, 1)
        self.lat5 = nn.Conv2d(64, 32, 1)
        self.smooth = cbr(32, 32)
        self.cls_head = nn.Sequential(cbr(32, 32), nn.Conv2d(32, num_anchors * num_classes, 1))
        self.box_head = nn.Sequential(cbr(32, 32), nn.Conv2d(32, num_anchors * 4, 1))

    def forward(self, x):
        f4 = self.c4(self.stem(x))
        f5 = self.c5(f4)
        p = self.lat4(f4) + F.interpolate(self.lat5(f5), scale_factor=2.0, mode="nearest")
        p = self.smooth(p)
        cls = self.cls_head(p).permute(0, 2, 3, 1).reshape(x.size(0), -1, self.num_classes)
        box = self.box_head(p).permute(0, 2, 3, 1).reshape(x.size(0), -1, 4)
        return cls, box


# ----------------------------------------------------------------------------- two inputs


class TwoInputs(nn.Module):
    """An RGB image and a second 3-channel image (e.g. another view); stems merged by cat."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem_a = cbr(3, 16)
        self.stem_b = cbr(3, 16)
        self.fuse = cbr(32, 32, 1)
        self.trunk = nn.Sequential(BasicBlock(32, 32, 2), BasicBlock(32, 64, 2), nn.MaxPool2d(2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, image, other):
        x = torch.cat([self.stem_a(image), self.stem_b(other)], dim=1)
        x = self.trunk(self.fuse(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------- functional ops


class Functional(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = cbr(3, 16)  # 32x32
        self.conv2 = cbr(16, 32)  # 16x16 after bilinear downsampling
        self.half_conv = cbr(16, 16)
        self.pointwise = nn.Linear(32, 32)  # 1x1 conv in channels-last layout
        self.conv3 = nn.Conv2d(32, 32, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 2 * 2, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        x = self.conv2(x)
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([b, self.half_conv(a)], dim=1)
        y = x.permute(0, 2, 3, 1)  # NHWC
        y = F.silu(self.pointwise(y))
        x = x + y.permute(0, 3, 1, 2)
        x = torch.sigmoid(self.bn3(self.conv3(x))) * x
        n = x.size(0)
        x = x.reshape(n, 32, 16 * 16).view(n, 32, 16, 16)
        x = F.max_pool2d(x, 2)
        x = F.interpolate(x, size=(16, 16), mode="nearest")
        x = F.avg_pool2d(x, 8)  # 2x2
        x = torch.flatten(x, 1).reshape(n, -1)
        return self.fc(x)


# ----------------------------------------------------------------------------- output structures


class DictOutput(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), BasicBlock(32, 32), nn.MaxPool2d(2))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        f = self.features(x)
        logits = self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1))
        return {"logits": logits, "features": f}


class TupleOutput(nn.Module):
    """Main logits plus auxiliary logits from an intermediate feature map."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stage1 = nn.Sequential(cbr(3, 16), BasicBlock(16, 32, 2))  # 16x16
        self.stage2 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64))  # 8x8
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        mid = self.stage1(x)
        out = self.stage2(mid)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1)), self.aux(mid)


# ----------------------------------------------------------------------------- registry

IMG = (3, 32, 32)

MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "vgg": lambda: _build(1, VGG, IMG),
    "resnet_basic": lambda: _build(2, ResNetBasic, IMG),
    "resnet_bottleneck": lambda: _build(3, ResNetBottleneck, IMG),
    "preact_resnet": lambda: _build(4, PreActResNet, IMG),
    "resnext": lambda: _build(5, ResNeXt, IMG),
    "mobilenetv2": lambda: _build(6, MobileNetV2, IMG),
    "mobilenetv3": lambda: _build(7, MobileNetV3, IMG),
    "densenet": lambda: _build(8, DenseNet, IMG),
    "inception": lambda: _build(9, Inception, IMG),
    "shufflenetv2": lambda: _build(10, ShuffleNetV2, IMG),
    "unet": lambda: _build(11, UNet, IMG),
    "detection": lambda: _build(12, TinyDetector, IMG),
    "two_inputs": lambda: _build(13, TwoInputs, IMG, IMG),
    "functional": lambda: _build(14, Functional, IMG),
    "dict_output": lambda: _build(15, DictOutput, IMG),
    "tuple_output": lambda: _build(16, TupleOutput, IMG),
}


# ----------------------------------------------------------------------------- random DAG


class RandomDAG(nn.Module):
    """Walks a fixed list of op specs; intermediate tensors live in a list (fx unrolls the loop).

    Spec kinds (tensor 0 is the input):
      ("conv", src, mod)    -> mods[mod](t[src])        (conv + bn [+ relu])
      ("relu", src)         -> relu(t[src])
      ("add", a, b)         -> t[a] + t[b]             (same shape)
      ("cat", srcs, mod)    -> mods[mod](cat(t[srcs]))  (same spatial size; 1x1 conv + bn + relu)
      ("maxpool"/"avgpool", src) -> 2x2 stride-2 pool
    The head average-pools every tensor nobody consumed, concatenates and applies a Linear.
    """

    def __init__(self, specs, mods, leaves, head_in, num_classes=10):
        super().__init__()
        self.specs = specs
        self.mods = nn.ModuleList(mods)
        self.leaves = leaves
        self.fc = nn.Linear(head_in, num_classes)

    def forward(self, x):
        t = [x]
        for spec in self.specs:
            kind = spec[0]
            if kind == "conv":
                t.append(self.mods[spec[2]](t[spec[1]]))
            elif kind == "relu":
                t.append(F.relu(t[spec[1]]))
            elif kind == "add":
                t.append(t[spec[1]] + t[spec[2]])
            elif kind == "cat":
                t.append(self.mods[spec[2]](torch.cat([t[i] for i in spec[1]], dim=1)))
            elif kind == "maxpool":
                t.append(F.max_pool2d(t[spec[1]], 2))
            elif kind == "avgpool":
                t.append(F.avg_pool2d(t[spec[1]], 2))
            else:  # pragma: no cover
                raise ValueError(kind)
        pooled = [F.adaptive_avg_pool2d(t[i], 1).flatten(1) for i in self.leaves]
        feats = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        return self.fc(feats)


def random_dag(seed: int, n_layers: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A random DAG-shaped CNN with ``n_layers`` ops after a conv stem; input 1x3x16x16."""
    if not 3 <= n_layers <= 30:
        raise ValueError("n_layers must be between 3 and 30")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    widths = (8, 16, 24, 32)
    shapes: list[tuple[int, int]] = [(3, 16)]  # (channels, spatial size) per tensor
    specs: list[tuple] = []
    mods: list[nn.Module] = []
    pools = 0

    def pick_src() -> int:
        if len(shapes) == 1:
            return 0
        if rng.random() < 0.6:
            return len(shapes) - 1
        return rng.randrange(1, len(shapes))  # never the raw input after the stem

    def add_conv(src: int, cout: int, k: int, relu: bool) -> None:
        cin, s = shapes[src]
        mods.append(cbr(cin, cout, k, act=nn.ReLU if relu else None))
        specs.append(("conv", src, len(mods) - 1))
        shapes.append((cout, s))

    add_conv(0, rng.choice(widths[:2]), 3, True)  # stem
    for _ in range(n_layers):
        kind = rng.choices(["conv", "relu", "add", "cat", "pool"], weights=[5, 1, 3, 2, 1])[0]
        if kind == "add":
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, sh in enumerate(shapes[1:], start=1):
                by_shape.setdefault(sh, []).append(i)
            groups = [g for g in by_shape.values() if len(g) >= 2]
            if groups:
                a, b = rng.sample(rng.choice(groups), 2)
                specs.append(("add", a, b))
                shapes.append(shapes[a])
                continue
            kind = "conv"
        if kind == "cat":
            src = pick_src()
            s = shapes[src][1]
            others = [i for i in range(1, len(shapes)) if shapes[i][1] == s and i != src]
            if others:
                srcs = [src] + rng.sample(others, min(len(others), rng.choice((1, 2))))
                rng.shuffle(srcs)
                cin = sum(shapes[i][0] for i in srcs)
                cout = rng.choice(widths)
                mods.append(cbr(cin, cout, 1))
                specs.append(("cat", srcs, len(mods) - 1))
                shapes.append((cout, s))
                continue
            kind = "conv"
        if kind == "pool":
            src = pick_src()
            if pools < 2 and shapes[src][1] >= 8:
                pools += 1
                specs.append((rng.choice(("maxpool", "avgpool")), src))
                c, s = shapes[src]
                shapes.append((c, s // 2))
                continue
            kind = "conv"
        if kind == "relu":
            src = pick_src()
            specs.append(("relu", src))
            shapes.append(shapes[src])
            continue
        # conv: often keep the width so that later adds find partners
        src = pick_src()
        cout = shapes[src][0] if rng.random() < 0.5 else rng.choice(widths)
        add_conv(src, cout, rng.choice((1, 3, 3)), rng.random() < 0.8)

    used: set[int] = set()
    for spec in specs:
        if spec[0] == "cat":
            used.update(spec[1])
        elif spec[0] == "add":
            used.update(spec[1:3])
        else:
            used.add(spec[1])
    leaves = [i for i in range(1, len(shapes)) if i not in used]
    head_in = sum(shapes[i][0] for i in leaves)

    model = RandomDAG(specs, mods, leaves, head_in)
    _randomize_bn(model)
    model.eval()
    return model, (torch.randn(1, 3, 16, 16),)
