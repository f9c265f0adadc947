"""Training and weight caching shared by the MNIST example models (torch).

Every MNIST example model file trains through ``train_classifier`` and caches through
``cached_weights``, so the training loop and the cache format exist once:

    model = cached_weights("mnist_resnet", spec, new_model, lambda: train_classifier(new_model(), ...))

``spec`` is a JSON-serialisable dict of everything that determines the trained weights
(architecture, hyper-parameters, split sizes); changing any of it changes the cache file name.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import mnist_digits  # same folder; on sys.path when legoc loads an example or one is run directly

Batches = list[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------- data

def batches(x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> Batches:
    """(x, y) NumPy arrays as a fixed-order list of (float32, int64) tensor batches."""
    return [(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])),
             torch.from_numpy(np.ascontiguousarray(y[i:i + batch_size])))
            for i in range(0, len(x), batch_size)]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of an (N, C, H, W) batch to size x size (identity when already that size)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


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


# ----------------------------------------------------------------------------- training

def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random (dy, dx) in [-max_shift, max_shift], background-filled."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    background = (0.0 - mnist_digits.MEAN) / mnist_digits.STD
    padded = nn.functional.pad(x, [max_shift] * 4, value=background)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs)])


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_classifier(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, *, epochs: int,
                     lr: float, weight_decay: float, batch_size: int = 64, seed: int = 0,
                     augment_shift: int = 2, num_threads: int = 2, val: Batches | None = None,
                     log: Callable[[str], None] | None = None, input_size: int | None = None) -> nn.Module:
    """Train ``model`` on the training digits with AdamW + one-cycle LR and random shifts.

    Deterministic for fixed arguments (seeded, CPU; the global RNG is left untouched).
    ``input_size``: resize every augmented batch (and ``val`` batches of another size) to
    input_size x input_size, bilinear, for models that take upsampled digits.
    ``val``: (x, y) batches scored after every epoch; the weights of the epoch with the best
    validation accuracy are returned (early stopping by model selection; ties keep the later
    epoch). Without ``val`` the last epoch's weights are returned. Returns ``model`` in eval mode.
    """
    log = log or _stderr
    x_all, y_all = torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(np.ascontiguousarray(y_train))
    if input_size is not None and val is not None:
        val = [(resize(torch.as_tensor(x), input_size), y) for x, y in val]
    best_acc, best_state = -1.0, None
    old_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    torch.set_flush_denormal(True)  # denormals can slow CPU training a lot
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            steps_per_epoch = (len(x_all) + batch_size - 1) // batch_size
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                        steps_per_epoch=steps_per_epoch)
            loss_fn = nn.CrossEntropyLoss()
            t0 = time.perf_counter()
            for epoch in range(epochs):
                model.train()
                perm = torch.randperm(len(x_all), generator=gen)
                total_loss = 0.0
                for i in range(0, len(x_all), batch_size):
                    idx = perm[i:i + batch_size]
                    xb = random_shift(x_all[idx], augment_shift, gen)
                    if input_size is not None:
                        xb = resize(xb, input_size)
                    loss = loss_fn(model(xb), y_all[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += loss.item() * len(idx)
                msg = f"epoch {epoch + 1}/{epochs} loss {total_loss / len(x_all):.4f}"
                if val is not None:
                    acc = evaluate(model, val)
                    msg += f" val_acc {acc:.4f}"
                    if acc >= best_acc:
                        best_acc, best_state = acc, copy.deepcopy(model.state_dict())
                log(f"{msg} ({time.perf_counter() - t0:.0f}s)")
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


# -------------------------------------------------------------------------------- cache

def train_config(**settings) -> dict:
    """The training settings of an MNIST example: these defaults, with ``settings`` replacing them."""
    return {
        "seed": 0,
        "split_seed": 0,
        "batch_size": 64,
        "optimizer": "adamw",
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "augment_shift": 2,  # random translation by up to this many pixels (at 28x28)
        "keep": "best_val_epoch",  # the epoch with the best val-split accuracy is returned
        "num_threads": 2,
    } | settings


def spec_hash(spec: dict) -> str:
    """16 hex digits identifying ``spec`` (key order does not matter)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(name: str, spec: dict) -> Path:
    """``${LEGOC_CACHE:-~/.cache/legoc}/examples/<name>-<hash16 of spec>.safetensors``."""
    root = os.environ.get("LEGOC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "legoc")
    return Path(root) / "examples" / f"{name}-{spec_hash(spec)}.safetensors"


def save_atomic(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the state dict as safetensors through a temporary file, so readers never see half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is ordinary shared data
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def cached_weights(name: str, spec: dict, new_model: Callable[[], nn.Module],
                   train: Callable[[], nn.Module]) -> nn.Module:
    """The trained model in eval mode: ``new_model()`` with the cached weights for ``spec``,
    or ``train()``'s result, saved to the cache first."""
    path = cache_path(name, spec)
    if path.exists():
        from safetensors.torch import load_file

        model = new_model()
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    _stderr(f"{name}: no cached weights at {path}; training")
    t0 = time.perf_counter()
    model = train()
    save_atomic(model, path, metadata={"config_hash": spec_hash(spec)})
    _stderr(f"{name}: trained in {time.perf_counter() - t0:.0f}s, cached at {path}")
    return model.eval()


# ------------------------------------------------------------------- one MNIST example model

class MnistExample:
    """What an MNIST example model file is besides its architecture: the seeded fresh model, the
    weight-cache spec, the splits as batches (upsampled to ``size`` if given), training and the
    cached trained model. A model file makes one and exposes its methods as the legoc model-file
    functions (``build_model = example.build_model`` and so on)."""

    def __init__(self, name: str, model_class: Callable[[], nn.Module], arch: dict, train: dict,
                 cache_version: int, batch_size: int = 64, size: int | None = None):
        self.name, self.model_class, self.arch, self.train_config = name, model_class, arch, train
        self.cache_version, self.batch_size, self.size = cache_version, batch_size, size
        self._splits = None
        self._batches: dict[str, Batches] = {}

    def new_model(self) -> nn.Module:
        """A fresh model: seeded Kaiming-normal convs, without touching the caller's RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train_config["seed"])
            model = self.model_class()
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        return model

    def spec(self) -> dict:
        """Everything that determines the trained weights: the cache key of ``build_model()``."""
        with torch.random.fork_rng(devices=[]):  # building a throwaway model must not touch the RNG
            modules = repr(self.model_class())
        return {
            "version": self.cache_version,
            "arch": self.arch,
            "train": self.train_config,
            "modules": modules,  # catches layer changes not reflected in arch
            "n_train": mnist_digits.N_TRAIN_PER_CLASS,
            "n_val": mnist_digits.N_VAL_PER_CLASS,
            "n_test": mnist_digits.N_TEST_PER_CLASS,
        }

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One split (train / val / test) as 28x28 NumPy arrays."""
        if self._splits is None:
            self._splits = mnist_digits.load_splits(seed=self.train_config["split_seed"])
        return self._splits[name]

    def batches(self, name: str) -> Batches:
        """One split as fixed-order (x, y) batches, upsampled to ``size`` if set (computed once)."""
        if name not in self._batches:
            self._batches[name] = [(resize(x, self.size) if self.size else x, y)
                                   for x, y in batches(*self.split(name), self.batch_size)]
        return list(self._batches[name])

    def train_data(self) -> Batches:
        return self.batches("train")

    def val_data(self) -> Batches:
        """What `legoc compile` measures on."""
        return self.batches("val")

    def test_data(self) -> Batches:
        """Reported accuracy only; `legoc compile` never reads it."""
        return self.batches("test")

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.batches("val")[0][0][:1].clone(),)

    def train(self, log=None) -> nn.Module:
        """Train a fresh model on the training split (28x28 digits shifted, then upsampled per
        batch if ``size``); the best epoch on the val split is kept."""
        log = log or (lambda msg: print(f"{self.name}: {msg}", file=sys.stderr, flush=True))
        t = self.train_config
        x, y = self.split("train")
        extra = {"input_size": self.size} if self.size else {}
        return train_classifier(self.new_model(), x, y, epochs=t["epochs"], lr=t["lr"],
                                weight_decay=t["weight_decay"], batch_size=t["batch_size"], seed=t["seed"],
                                augment_shift=t["augment_shift"], num_threads=t["num_threads"],
                                val=self.val_data(), log=log, **extra)

    def build_model(self) -> nn.Module:
        """The trained model (eval mode): loaded from the cache, or trained and cached."""
        return cached_weights(self.name, self.spec(), self.new_model, self.train)

    def cache_path(self) -> Path:
        return cache_path(self.name, self.spec())

    def main(self) -> None:
        """What ``python examples/<model>.py`` does: build (train once) and report."""
        t = time.perf_counter()
        m = self.build_model()
        print(f"build_model {time.perf_counter() - t:.1f}s, val accuracy {evaluate(m, self.val_data()):.4f}, "
              f"test accuracy {evaluate(m, self.test_data()):.4f}, "
              f"{sum(p.numel() for p in m.parameters())} params, cache {self.cache_path()}")
