"""The several-devices commands end to end, as a user runs them: a 128x128 VGG-style chain
compiled with ``--tiles 2`` against two loopback TVM RPC workers (measured plan), then run on
them with ``legoc run --cluster --record`` and shown by ``legoc inspect``; and the same model
with tiles forced by an assumed ideal link (``--tile-link 0.1,100000``), to compare the
estimate of a tiled step with its measurement.

    .venv/bin/python benchmarks/tiles_cli.py [--calls 20] [--work /tmp/legoc-tiles]

One TVM thread everywhere (TVM_NUM_THREADS=1): the workers are pinned to one core each.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = '''
import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    layers, cin = [], 3
    for v in (32, 32, "M", 64, 64, "M", 64, 64, "M", 64):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 16 * 16, 10)).eval()


def example_inputs():
    torch.manual_seed(1)
    return (torch.randn(1, 3, 128, 128),)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--work", default="/tmp/legoc-tiles")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "wide.py").write_text(MODEL)
    env = dict(os.environ, TVM_NUM_THREADS="1")

    import numpy as np
    import torch

    from legoc.modelfile import load_model_file
    from legoc.runtime.cluster import LocalWorkers

    spec = load_model_file(work / "wide.py")
    x = spec.example_inputs[0]
    np.save(work / "x.npy", x.numpy())
    with torch.no_grad():
        ref = spec.model(x).numpy()

    def legoc(*argv: str) -> None:
        print("$ legoc " + " ".join(argv), flush=True)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "legoc", *argv], env=env, capture_output=True, text=True)
        print(out.stdout.rstrip(), flush=True)
        if out.returncode:
            raise SystemExit(f"legoc {argv[0]} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
        print(f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    common = ("--ratios", "0", "--retrain-epochs", "0", "--tiles", "2", "--no-progress")
    with LocalWorkers(2, threads=1) as workers:
        cluster = ",".join(workers.addresses)
        for name, extra in (("measured", ("--cluster", cluster)), ("forced", ("--tile-link", "0.1,100000"))):
            art = work / f"wide-{name}.lego"
            legoc("compile", str(work / "wide.py"), *common, *extra, "-o", str(art))
            legoc("run", str(art), "-i", str(work / "x.npy"), "-o", str(work / f"out-{name}.npy"),
                  "--cluster", cluster, "--calls", str(args.calls), "--record")
            legoc("inspect", str(art))
            diff = float(np.abs(np.load(work / f"out-{name}.npy") - ref).max())
            print(f"{name} plan: max abs diff to torch {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
