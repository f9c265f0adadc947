"""A small ResNet for 1x28x28 MNIST digits, trained on the 4,000 training digits of mnist_digits.

Stem conv 1->16 + BN + ReLU, then three stages of two basic blocks at 16/32/64 channels
(stride-2 stage transitions with 1x1 conv + BN downsample shortcuts, ``out += identity``
residuals), global average pool and Linear(64, 10).

``build_model()`` returns the *trained* model. Weights are cached as safetensors at
``${LEGOC_CACHE:-~/.cache/legoc}/examples/mnist_resnet-<hash>.safetensors``, where <hash>
covers the architecture and the training hyper-parameters, so changing either retrains.
When the cache file is missing the model is trained (seeded, deterministic, CPU, well under
three minutes on two cores) and the cache written atomically.

legoc model.py convention: ``build_model()``, ``example_inputs()``, ``train_data()``,
``val_data()``, ``evaluate(model, data)`` (top-1 accuracy in [0, 1]).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mnist_digits  # same folder; on sys.path when legoc loads this file or when run directly

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
TRAIN = {
    "seed": 0,
    "split_seed": 0,
    "epochs": 8,
    "batch_size": BATCH_SIZE,
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "augment_shift": 2,  # random translation by up to this many pixels
    "num_threads": 2,
}
CACHE_VERSION = 1  # bump to invalidate caches written by an older training procedure


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


class MnistResNet(nn.Module):
    def __init__(self, arch=ARCH):
        super().__init__()
        c0 = arch["stem_channels"]
        self.conv1 = nn.Conv2d(arch["in_channels"], c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], c0
        for i, ch in enumerate(arch["stage_channels"]):
            blocks = []
            for j in range(arch["blocks_per_stage"]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, arch["num_classes"])

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _new_model() -> MnistResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN["seed"])
        model = MnistResNet()
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def config_hash() -> str:
    """Hash of everything that determines the trained weights (architecture + training)."""
    with torch.random.fork_rng(devices=[]):  # building a throwaway model must not touch the RNG
        modules = repr(MnistResNet())
    spec = {
        "version": CACHE_VERSION,
        "arch": ARCH,
        "train": TRAIN,
        "modules": modules,  # catches layer changes not reflected in ARCH
        "n_train": mnist_digits.N_TRAIN_PER_CLASS,
        "n_val": mnist_digits.N_VAL_PER_CLASS,
    }
    blob = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path() -> Path:
    root = os.environ.get("LEGOC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "legoc")
    return Path(root) / "examples" / f"mnist_resnet-{config_hash()}.safetensors"


# --------------------------------------------------------------------------------- data

_SPLIT = None


def _split():
    global _SPLIT
    if _SPLIT is None:
        _SPLIT = mnist_digits.load_split(seed=TRAIN["split_seed"])
    return _SPLIT


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int = BATCH_SIZE):
    return [(torch.from_numpy(x[i:i + batch_size].copy()), torch.from_numpy(y[i:i + batch_size].copy()))
            for i in range(0, len(x), batch_size)]


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 4,000 training digits as (x, y) batches of 64 (fixed order)."""
    x, y, _, _ = _split()
    return _batches(x, y)


def val_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 1,000 held-out digits as (x, y) batches of 64."""
    _, _, x, y = _split()
    return _batches(x, y)


def evaluate(model: nn.Module, data) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) over (x, y) batches."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data:
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            pred = model(x).argmax(dim=1)
            correct += int((pred == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)


def example_inputs() -> tuple[torch.Tensor, ...]:
    _, _, x, _ = _split()
    return (torch.from_numpy(x[:1].copy()),)


# ----------------------------------------------------------------------------- training

def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [-max_shift, max_shift], background-filled."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    background = (0.0 - mnist_digits.MEAN) / mnist_digits.STD
    padded = nn.functional.pad(x, [max_shift] * 4, value=background)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs)])


def train(log=None) -> MnistResNet:
    """Train a fresh model on the training split (deterministic for fixed TRAIN settings)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    x_train, y_train, _, _ = _split()
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    val = val_data()
    model = _new_model()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN["num_threads"])
    torch.set_flush_denormal(True)  # denormals can slow CPU training a lot
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TRAIN["seed"])
            gen = torch.Generator().manual_seed(TRAIN["seed"])
            opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"],
                                    weight_decay=TRAIN["weight_decay"])
            steps_per_epoch = (len(x_train) + BATCH_SIZE - 1) // BATCH_SIZE
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=TRAIN["lr"], epochs=TRAIN["epochs"], steps_per_epoch=steps_per_epoch)
            loss_fn = nn.CrossEntropyLoss()
            t0 = time.perf_counter()
            for epoch in range(TRAIN["epochs"]):
                model.train()
                perm = torch.randperm(len(x_train), generator=gen)
                total_loss = 0.0
                for i in range(0, len(x_train), BATCH_SIZE):
                    idx = perm[i:i + BATCH_SIZE]
                    xb = _shift(x_train[idx], TRAIN["augment_shift"], gen)
                    loss = loss_fn(model(xb), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += loss.item() * len(idx)
                acc = evaluate(model, val)
                log(f"mnist_resnet: epoch {epoch + 1}/{TRAIN['epochs']} "
                    f"loss {total_loss / len(x_train):.4f} val_acc {acc:.4f} "
                    f"({time.perf_counter() - t0:.0f}s)")
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)
    return model.eval()


def _save_atomic(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"config_hash": config_hash()})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is ordinary shared data
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def build_model() -> nn.Module:
    """The trained model (eval mode): loaded from the cache, or trained and cached."""
    path = cache_path()
    if path.exists():
        from safetensors.torch import load_file

        model = _new_model()
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    print(f"mnist_resnet: no cached weights at {path}; training (takes about a minute or two)",
          file=sys.stderr, flush=True)
    model = train()
    _save_atomic(model, path)
    return model


if __name__ == "__main__":
    t = time.perf_counter()
    m = build_model()
    print(f"build_model {time.perf_counter() - t:.1f}s, val accuracy {evaluate(m, val_data()):.4f}, "
          f"{sum(p.numel() for p in m.parameters())} params, cache {cache_path()}")
