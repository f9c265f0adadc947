"""VGG-style plain chain (3x32x32 input, 10 classes) with random, seeded weights.

Eight conv-BN-ReLU layers (32-32-M-64-64-M-128-128-M-256-256-M), then flatten + Linear.
No residuals: the simplest graph for the compiler to split into blocks.

legoc model.py convention: ``build_model()``, ``example_inputs()``.
"""
from __future__ import annotations

import torch
from torch import nn

SEED = 0
NUM_CLASSES = 10
CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGGChain(nn.Module):
    def __init__(self, cfg=CFG, num_classes=NUM_CLASSES, in_ch=3, in_size=32):
        super().__init__()
        layers, size = [], in_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False),
                           nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch * size * size, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _init_weights(model: nn.Module) -> None:
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = VGGChain()
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
