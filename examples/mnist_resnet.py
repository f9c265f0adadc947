"""A small ResNet for 1x28x28 MNIST digits, trained on the 3,000 training digits of mnist_digits.

Stem conv 1->16 + BN + ReLU, then three stages of two basic blocks at 16/32/64 channels
(stride-2 stage transitions with 1x1 conv + BN downsample shortcuts, ``out += identity``
residuals), global average pool and Linear(64, 10).

``build_model()`` returns the *trained* model. Weights are cached as safetensors at
``${LEGOC_CACHE:-~/.cache/legoc}/examples/mnist_resnet-<hash>.safetensors``, where <hash>
covers the architecture and the training hyper-parameters, so changing either retrains.
When the cache file is missing the model is trained (seeded, deterministic, CPU, well under
three minutes on two cores) and the cache written atomically.

Training (examples/mnist_training.py) uses the train split and keeps the epoch with the best
val-split accuracy; the test split is only for reporting.

legoc model.py convention: ``build_model()``, ``example_inputs()``, ``train_data()``,
``val_data()``, ``test_data()``, ``evaluate(model, data)`` (top-1 accuracy in [0, 1]).
"""
from __future__ import annotations


import torch
from torch import nn

import mnist_training  # same folder; on sys.path when legoc loads this file or when run directly
from resnet_layers import stages

NUM_CLASSES = 10
BATCH_SIZE = 64
ARCH = {
    "name": "mnist_resnet",
    "in_channels": 1,
    "stem_channels": 16,
    "stage_channels": [16, 32, 64],
    "blocks_per_stage": 2,
    "num_classes": NUM_CLASSES,
}
TRAIN = mnist_training.train_config(epochs=8, lr=3e-3, batch_size=BATCH_SIZE)
CACHE_VERSION = 2  # bump to invalidate caches written by an older training procedure


class MnistResNet(nn.Module):
    def __init__(self, arch=ARCH):
        super().__init__()
        c0 = arch["stem_channels"]
        self.conv1 = nn.Conv2d(arch["in_channels"], c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        (self.layer1, self.layer2, self.layer3), in_ch = stages(c0, arch["stage_channels"], arch["blocks_per_stage"])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, arch["num_classes"])

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)



EXAMPLE = mnist_training.MnistExample(ARCH["name"], MnistResNet, ARCH, TRAIN, CACHE_VERSION, BATCH_SIZE)

# the legoc model-file functions (see examples/mnist_training.py)
build_model = EXAMPLE.build_model
example_inputs = EXAMPLE.example_inputs
train_data = EXAMPLE.train_data  # the 3,000 training digits as (x, y) batches of 64 (fixed order)
val_data = EXAMPLE.val_data  # the 1,000 validation digits: what `legoc compile` measures on
test_data = EXAMPLE.test_data  # the 1,000 test digits: reported accuracy only, never compile
evaluate = mnist_training.evaluate  # top-1 accuracy in [0, 1] over (x, y) batches
spec, train, cache_path = EXAMPLE.spec, EXAMPLE.train, EXAMPLE.cache_path


def config_hash() -> str:
    """Hash of everything that determines the trained weights (architecture + training)."""
    return mnist_training.spec_hash(spec())


if __name__ == "__main__":
    EXAMPLE.main()
