"""A ResNet-18-width network on MNIST digits upsampled to 64x64: the example whose latency scales.

The bundled small example (mnist_resnet.py, 20 M MACs) runs in about half a millisecond, where
call overheads hide most of what pruning saves. This one has ImageNet ResNet-18's widths and
depth (stages of two basic blocks at 64/128/256/512 channels, stride-2 stage transitions with
1x1 conv + BN downsample shortcuts) on 1x64x64 inputs, 157.6 M MACs:

* stem: conv 3x3 stride 2 (1->32) + BN + ReLU, conv 3x3 (32->64) + BN + ReLU, max-pool 3x3
  stride 2 -> 64x16x16 (a two-conv "deep stem": ImageNet's 7x7 stride-2 conv + max-pool gives
  139 M MACs at 64x64, short of the 150 M this example is meant to have);
* layer1..layer4 at 16x16, 8x8, 4x4, 2x2; global average pool; Linear(512, 10).

``legoc compile examples/mnist_resnet18.py --blocks 8`` cuts it into its 8 basic blocks.

Data: the 3,000 / 1,000 / 1,000 train / val / test digits of mnist_digits, upsampled to 64x64
(bilinear, torch interpolate) in the data functions, so the model and legoc only ever see
64x64 images. Training (examples/mnist_training.py): AdamW + one-cycle, random shifts of up to
2 pixels at 28x28 before upsampling, the epoch with the best val-split accuracy kept; cached
as safetensors in ``${LEGOC_CACHE:-~/.cache/legoc}/examples/mnist_resnet18-<hash>.safetensors``.
Training takes about 7.5 minutes on two cores (8 epochs) and reaches 98.6% on the val split and
98.6% on the test split.

legoc model.py convention: ``build_model()``, ``example_inputs()``, ``train_data()``,
``val_data()``, ``test_data()``, ``evaluate(model, data)`` (top-1 accuracy in [0, 1]).
"""
from __future__ import annotations


import torch
from torch import nn

import mnist_training  # same folder; on sys.path when legoc loads this file or when run directly
from resnet_layers import stages  # the same residual blocks as the small example

SIZE = 64  # input side after upsampling
BATCH_SIZE = 64
ARCH = {
    "name": "mnist_resnet18",
    "in_channels": 1,
    "input_size": SIZE,
    "stem": [32, 64],
    "stage_channels": [64, 128, 256, 512],
    "blocks_per_stage": 2,
    "num_classes": 10,
}
TRAIN = mnist_training.train_config(epochs=8, lr=2e-3, batch_size=BATCH_SIZE)  # shifts at 28x28, then upsampling
CACHE_VERSION = 1  # bump to invalidate caches written by an older training procedure


class MnistResNet18(nn.Module):
    def __init__(self, arch=ARCH):
        super().__init__()
        s0, s1 = arch["stem"]
        self.stem = nn.Sequential(
            nn.Conv2d(arch["in_channels"], s0, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(s0),
            nn.ReLU(inplace=True),
            nn.Conv2d(s0, s1, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(s1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        (self.layer1, self.layer2, self.layer3, self.layer4), in_ch = stages(
            s1, arch["stage_channels"], arch["blocks_per_stage"])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, arch["num_classes"])

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)



EXAMPLE = mnist_training.MnistExample(ARCH["name"], MnistResNet18, ARCH, TRAIN, CACHE_VERSION, BATCH_SIZE, size=SIZE)

# the legoc model-file functions (see examples/mnist_training.py); every split at 64x64
build_model = EXAMPLE.build_model
example_inputs = EXAMPLE.example_inputs
train_data = EXAMPLE.train_data
val_data = EXAMPLE.val_data
test_data = EXAMPLE.test_data
evaluate = mnist_training.evaluate  # top-1 accuracy in [0, 1] over (x, y) batches
spec, train = EXAMPLE.spec, EXAMPLE.train

if __name__ == "__main__":
    EXAMPLE.main()
