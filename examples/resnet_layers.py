"""The residual layers the ResNet examples share (cifar_resnet, mnist_resnet, mnist_resnet18)."""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv + BN where stride or width change)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:  # structural, not data-dependent: fx-traceable
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def stages(in_ch: int, stage_channels, blocks_per_stage: int) -> tuple[list[nn.Sequential], int]:
    """One nn.Sequential of basic blocks per stage (stride 2 entering every stage but the first)
    and the channels out of the last."""
    out = []
    for i, ch in enumerate(stage_channels):
        blocks = []
        for j in range(blocks_per_stage):
            blocks.append(BasicBlock(in_ch, ch, 2 if (i > 0 and j == 0) else 1))
            in_ch = ch
        out.append(nn.Sequential(*blocks))
    return out, in_ch
