"""One block run across loopback TVM RPC workers: spatial tiles vs one worker (issue 19).

    .venv/bin/python benchmarks/cluster.py [--size 224] [--layers 2] [--calls 20] [--workers 1,2]

The early part of ResNet-18 (the torchvision architecture, random weights: 7x7/2 conv-BN-ReLU,
3x3/2 max pool, then ``--layers`` stages of two basic blocks) at ``--size`` x ``--size``, batch 1,
tiled by legoc.passes.tiling into equal row shares (one tile per worker), each distinct tile
compiled for the host by legoc's back end (prepacked weights), and run by
legoc.runtime.cluster.Cluster on N loopback TVM RPC servers, each pinned to its own core with
taskset and running one thread. Per N: the median latency of ``--calls`` calls (send the input
bands, run, gather, stitch; measured end to end in this process), the speedup over N = 1, the
bytes moved per call, the halo rows (input rows sent twice), and the largest difference from the
torch block (must be <= 1e-4). The workers share this machine with anything else running on it;
with 2 cores, 2 workers are its limit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from resnet_layers import BasicBlock  # noqa: E402

from legoc.passes.tiling import compile_tiles, tile_plan  # noqa: E402
from legoc.runtime.cluster import Cluster, LocalWorkers  # noqa: E402
from legoc.targets.table import TARGETS  # noqa: E402


def resnet18_front(layers: int) -> nn.Module:
    stages = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, ch in enumerate((64, 128, 256, 512)[:layers]):
        stages += [BasicBlock(cin, ch, 1 if i == 0 else 2), BasicBlock(ch, ch)]
        cin = ch
    return nn.Sequential(*stages).eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--layers", type=int, default=2, help="ResNet-18 stages after the stem (1-4)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(resnet18_front(args.layers))
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        ref = gm(x).numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(v) for v in args.workers.split(",")]:
            plan = tile_plan(gm, x, (1,) * n)
            t0 = time.perf_counter()
            tiles = compile_tiles(plan, x, TARGETS["host"], Path(tmp) / f"n{n}", prepack=True)
            build_s = time.perf_counter() - t0
            with LocalWorkers(n) as workers, Cluster(workers.addresses, tiles, timeout=120) as cluster:
                out = cluster(x.numpy())  # warm-up
                times = []
                for _ in range(args.calls):
                    t = time.perf_counter()
                    out = cluster(x.numpy())
                    times.append((time.perf_counter() - t) * 1e3)
                moved = sum(cluster.stats.sent) + sum(cluster.stats.received)
                worker_ms = [s * 1e3 for s in cluster.stats.seconds]
            rows.append((n, statistics.median(times), moved, plan.halo_rows, float(np.abs(out - ref).max()),
                         build_s, worker_ms, workers.pinned))
    base = rows[0][1]
    print(f"ResNet-18 stem + {args.layers} stage(s) at {args.size}x{args.size}, batch 1, loopback TVM RPC workers "
          f"(1 thread each, {'taskset-pinned' if rows[0][7] else 'unpinned'}), median of {args.calls} calls\n")
    print("| workers | latency ms | speedup | bytes moved / call | halo rows | last call per worker ms | max abs diff | compile s |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for n, ms, moved, halo, diff, build_s, worker_ms, _ in rows:
        print(f"| {n} | {ms:.1f} | {base / ms:.2f}x | {moved / 1e6:.2f} MB | {halo} | "
              f"{', '.join(f'{w:.1f}' for w in worker_ms)} | {diff:.1e} | {build_s:.1f} |")


if __name__ == "__main__":
    main()
