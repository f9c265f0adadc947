"""The model-grained baseline (legoc.baseline): the whole model pruned at one ratio with legoc's
passes, fine-tuned end to end within a wall-clock budget, compiled with legoc's back end and
exported to ONNX; the same network everywhere."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from legoc.baseline import BaselineConfig, compile_pruned, export_onnx, finetune, prune_uniform
from legoc.errors import UserError


class Tiny(nn.Module):
    """A stem, two residual blocks and a classifier: two blocks with interior channels to prune."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(x + self.b2(x))
        return self.fc(x.mean((2, 3)))


def _data(n_batches: int, seed: int):
    """Batches of a learnable 4-class task: the class is which quadrant is bright."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 4, (16,), generator=gen)
        x = 0.3 * torch.randn(16, 1, 8, 8, generator=gen)
        for i, c in enumerate(y.tolist()):
            x[i, 0, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] += 1.0
        out.append((x, y))
    return out


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)   # tiny tensors: OpenMP barriers on a loaded 2-core machine cost more than they save
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for x, y in _data(12, 1):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def test_pruned_architecture_is_legocs_uniform_configuration(teacher):
    example = (torch.randn(1, 1, 8, 8),)
    pruned = prune_uniform(teacher, example, BaselineConfig(ratio=0.5, blocks=2))
    assert len(pruned.partition.blocks) == 2
    for block in pruned.partition.blocks:
        # the 16 interior channels of each block are halved; boundaries keep 8
        assert [tuple(c[:2]) for c in pruned.channels[block.name].values()] == [(16, 8)]   # (original, kept, ...)
        convs = [m for m in pruned.model.parts[block.name].modules() if isinstance(m, nn.Conv2d)]
        assert max(max(c.in_channels, c.out_channels) for c in convs) == 8
    full = prune_uniform(teacher, example, BaselineConfig(ratio=0.0, blocks=2))
    assert pruned.macs < full.macs
    with torch.no_grad():   # ratio 0 recomposes the original model exactly
        x = torch.randn(3, 1, 8, 8)
        torch.testing.assert_close(full.model(x), teacher(x))


def test_finetune_keeps_to_its_budget_and_recovers_accuracy(teacher):
    example = (torch.randn(1, 1, 8, 8),)
    train, val = _data(12, 2), _data(4, 3)
    cfg = BaselineConfig(ratio=0.75, blocks=2, seconds=120.0, lr=3e-3, max_epochs=4, num_threads=1)
    pruned = prune_uniform(teacher, example, cfg)
    report = finetune(pruned, teacher, train, cfg, val=val)
    assert report["epochs"] == 4 and report["steps"] == 4 * len(train)
    assert report["val_after"] >= report["val_before"]
    assert report["val_after"] >= 0.9
    assert not any(p.requires_grad for p in pruned.model.parameters())
    # a budget shorter than an epoch stops inside it
    short = dataclasses.replace(cfg, seconds=0.5, max_epochs=50)
    report = finetune(prune_uniform(teacher, example, short), teacher, train * 20, short)
    assert report["epochs"] == 0 and report["steps"] < 20 * len(train)


def test_compiled_and_onnx_baselines_compute_the_fine_tuned_network(teacher, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from legoc.runtime import load

    example = (torch.randn(1, 1, 8, 8),)
    cfg = BaselineConfig(ratio=0.5, blocks=2, seconds=1.0, num_threads=1)
    pruned = prune_uniform(teacher, example, cfg)
    finetune(pruned, teacher, _data(6, 4), cfg)
    manifest = compile_pruned(pruned, example, tmp_path / "b.lego")
    blocks = [s for s in manifest["segments"] if s["kind"] == "block"]
    assert len(blocks) == 2 and all(len(s["variants"]) == 1 and s["variants"][0]["ratio"] == 0.5 for s in blocks)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = pruned.model(torch.from_numpy(x)).numpy()
    m = load(tmp_path / "b.lego").configure(variants=[0, 0])
    np.testing.assert_allclose(m(x), want, rtol=1e-4, atol=1e-4)
    path = export_onnx(pruned, example, tmp_path / "b.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input0": x})[0], want, rtol=1e-4, atol=1e-4)


def test_finetune_needs_labels(teacher):
    example = (torch.randn(1, 1, 8, 8),)
    cfg = BaselineConfig(ratio=0.5, blocks=2, seconds=1.0)
    pruned = prune_uniform(teacher, example, cfg)
    with pytest.raises(UserError, match="needs train_data\\(\\) batches of \\(input, class label\\)"):
        finetune(pruned, teacher, [(torch.randn(4, 1, 8, 8),)], cfg)
    with pytest.raises(UserError, match="baseline ratio must be in"):
        BaselineConfig(ratio=1.0)
