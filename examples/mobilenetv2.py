"""MobileNetV2-style net for 3x32x32 inputs (10 classes) with random, seeded weights.

Stem conv 3->32, then 8 inverted residual blocks (1x1 expand conv-BN-ReLU6, 3x3 depthwise
conv-BN-ReLU6, 1x1 linear projection conv-BN; residual add when stride 1 and in == out),
a 1x1 head conv 96->256, global average pool and Linear(256, 10). As in MobileNetV2 the
first block uses expansion 1 and so has no expand conv. Strides are reduced for 32x32 input.

legoc model.py convention: ``build_model()``, ``example_inputs()``.
"""
from __future__ import annotations

import torch
from torch import nn

import seeded  # same folder; on sys.path when legoc loads this file or when run directly

SEED = 0
NUM_CLASSES = 10
STEM_CHANNELS = 32
HEAD_CHANNELS = 256
# (expansion t, out channels c, repeats n, first stride s), as in the MobileNetV2 paper.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)


def conv_bn(in_ch, out_ch, kernel, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2,
                        groups=groups, bias=False),
              nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_res = stride == 1 and in_ch == out_ch
        layers = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_ch, hidden, 1))  # expand
        layers.append(conv_bn(hidden, hidden, 3, stride=stride, groups=hidden))  # depthwise
        layers.append(conv_bn(hidden, out_ch, 1, act=False))  # linear projection
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:  # fixed at construction: fx-traceable
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, settings=SETTINGS, num_classes=NUM_CLASSES):
        super().__init__()
        layers = [conv_bn(3, STEM_CHANNELS, 3)]
        in_ch = STEM_CHANNELS
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(conv_bn(in_ch, HEAD_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def build_model() -> nn.Module:
    return seeded.build(MobileNetV2, SEED)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return seeded.random_input((1, 3, 32, 32), SEED + 1)


if __name__ == "__main__":
    seeded.describe(build_model, example_inputs)
