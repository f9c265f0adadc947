"""Time of each pipeline stage of `legoc compile` for the example models.

    .venv/bin/python benchmarks/compile_time.py [--target host] [--models vgg_chain,cifar_resnet,...]

Prints one row per model: load, capture, partition, prune, BN recalibration + retraining (only
models with train_data(); cached retraining takes no time), TVM compile per variant (mean), and
the whole compile+write stage. Delete ~/.cache/legoc/retrain to time retraining afresh.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from legoc.pipeline import CompileConfig, compile_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["vgg_chain", "cifar_resnet", "mobilenetv2", "mnist_resnet"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="host")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    table = Table(title=f"legoc compile stage times (s), target {args.target}, default options")
    for col in ("model", "blocks×variants", "load", "capture", "partition", "prune", "recalibrate+retrain",
                "compile/variant", "compile+write", "total"):
        table.add_column(col, justify="left" if col == "model" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            rep = compile_model(ROOT / "examples" / f"{name}.py",
                                CompileConfig(target=args.target, output=Path(tmp) / f"{name}.lego", progress=False))
            total = time.perf_counter() - t0
            t = rep.timings
            per = [s for _, _, s in rep.compile_seconds]
            nb = len(rep.partition.blocks)
            table.add_row(name, f"{nb}×{len(rep.manifest['options']['ratios'])}", f"{t['load']:.2f}",
                          f"{t['capture']:.2f}", f"{t['partition']:.2f}", f"{t['prune']:.2f}",
                          f"{t.get('recalibrate', 0) + t.get('retrain', 0):.1f}",
                          f"{statistics.mean(per):.2f}", f"{t['compile+write']:.1f}", f"{total:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
