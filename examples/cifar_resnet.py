"""CIFAR-style ResNet-20 (3x32x32 input, 10 classes) with random, seeded weights.

Three stages of three basic blocks at 16/32/64 channels; the first block of stages 2 and 3
has stride 2 and a 1x1 conv + BN downsample shortcut; residuals use ``out += identity``.
No data: this example exercises the compiler on a residual network.

legoc model.py convention: ``build_model()``, ``example_inputs()``.
"""
from __future__ import annotations

import torch
from torch import nn

SEED = 0
NUM_CLASSES = 10
STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 3  # 6n+2 = 20 layers for n = 3


class BasicBlock(nn.Module):
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


class CifarResNet(nn.Module):
    def __init__(self, stage_channels=STAGE_CHANNELS, blocks_per_stage=BLOCKS_PER_STAGE,
                 num_classes=NUM_CLASSES):
        super().__init__()
        c0 = stage_channels[0]
        self.conv1 = nn.Conv2d(3, c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], c0
        for i, ch in enumerate(stage_channels):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _init_weights(model: nn.Module) -> None:
    """Kaiming convs plus randomized BN affine/statistics, so channels differ in importance."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def build_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(SEED)
        model = CifarResNet()
        _init_weights(model)
    return model.eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        return (torch.randn(1, 3, 32, 32),)


if __name__ == "__main__":
    m = build_model()
    (x,) = example_inputs()
    print(m(x).shape, sum(p.numel() for p in m.parameters()), "params")
