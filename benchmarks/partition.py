"""Partition time and scalable-MACs share for every zoo model, and a ~500-node graph.

    .venv/bin/python benchmarks/partition.py

Times only the partition pass (regions + CP-SAT selection + segment extraction), after capture.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from legoc.passes import ProgramState
from legoc.passes.capture import Capture
from legoc.passes.partition import partition

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("legoc_zoo", ROOT / "tests" / "zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


class DeepResNet(nn.Module):
    """A deep residual chain whose fx graph has about 500 nodes."""

    def __init__(self, blocks: int = 71, c: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)) for _ in range(blocks))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return self.fc(x.mean((2, 3)))


def measure(name, model, inputs, repeats=3):
    gm = Capture()(ProgramState(model=model.eval(), example_inputs=inputs), None).state.gm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        part = partition(gm)
        best = min(best, time.perf_counter() - t0)
    nodes = len(gm.graph.nodes)
    return (name, nodes, len(part.blocks), len(part.segments) - len(part.blocks), part.max_blocks,
            part.scalable_share, best)


def main() -> None:
    rows = [measure(n, *zoo.MODELS[n]()) for n in sorted(zoo.MODELS)]
    rows.append(measure("deep_resnet_500", DeepResNet(), (torch.randn(1, 3, 16, 16),), repeats=2))
    t = Table(title="partition (best of 3; default K = up to 4 blocks)")
    for col in ("model", "fx nodes", "blocks", "frame segs", "max blocks", "scalable MACs", "partition s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, nodes, nb, nf, mx, share, sec in rows:
        t.add_row(name, str(nodes), str(nb), str(nf), str(mx), f"{share:.1%}", f"{sec:.3f}")
    Console(width=120).print(t)


if __name__ == "__main__":
    main()
