"""CIFAR-style ResNet-20 (3x32x32 input, 10 classes) with random, seeded weights.

Three stages of three basic blocks at 16/32/64 channels; the first block of stages 2 and 3
has stride 2 and a 1x1 conv + BN downsample shortcut; residuals use ``out += identity``.
No data: this example exercises the compiler on a residual network.

legoc model.py convention: ``build_model()``, ``example_inputs()``.
"""
from __future__ import annotations

import torch
from torch import nn

import seeded  # same folder; on sys.path when legoc loads this file or when run directly
from resnet_layers import stages

SEED = 0
NUM_CLASSES = 10
STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 3  # 6n+2 = 20 layers for n = 3


class CifarResNet(nn.Module):
    def __init__(self, stage_channels=STAGE_CHANNELS, blocks_per_stage=BLOCKS_PER_STAGE,
                 num_classes=NUM_CLASSES):
        super().__init__()
        c0 = stage_channels[0]
        self.conv1 = nn.Conv2d(3, c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        (self.layer1, self.layer2, self.layer3), in_ch = stages(c0, stage_channels, blocks_per_stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_model() -> nn.Module:
    return seeded.build(CifarResNet, SEED)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return seeded.random_input((1, 3, 32, 32), SEED + 1)


if __name__ == "__main__":
    seeded.describe(build_model, example_inputs)
