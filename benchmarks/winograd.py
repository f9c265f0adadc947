"""Where Winograd F(4x4, 3x3) pays: one 3x3 stride-1 conv (+ bias + ReLU) built as the direct
packed conv and as Winograd, timed in alternating rounds, for a list of shapes.

    .venv/bin/python benchmarks/winograd.py [--threads 2] [--rounds 5] [--number 100]
                                            [--shapes 64x64x56,16x64x56,...]

Each shape ``CINxCOUTxHW`` is built twice with ``build_module(prepack=True)`` (as legoc's
artifacts are): once with the Winograd rewrite forced on (its thresholds
``MIN_CHANNELS``/``MAX_FILTER_BYTES_PER_TILE`` moved to take the shape) and once forced off (the direct
packed conv). Both outputs are checked against PyTorch. Then each module runs
``--number`` calls per round (TVM's time evaluator, VM ``invoke_stateful``), the two
alternating for ``--rounds`` rounds; the table gives each one's median over rounds and their
ratio paired per round. The thresholds in ``legoc.targets.schedules.winograd`` come from this
table; ``TVM_NUM_THREADS`` is set from ``--threads`` before TVM starts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ResNet-18's stride-1 3x3 convs at 56 and 28 wide and their pruned interiors (a block's first
# conv narrowed, then its second); small channel counts; weight-heavy convs on small maps
SHAPES = ("64x64x56,48x64x56,64x48x56,32x64x56,64x32x56,16x64x56,64x16x56,16x16x56,"
          "128x128x28,64x128x28,128x64x28,32x128x28,128x32x28,32x32x28,16x16x28,"
          "256x256x16,64x64x16,16x16x16,128x128x8,256x256x8,512x512x8,3x64x32,8x32x32")


def build(cin: int, cout: int, hw: int, winograd: bool, folder: Path):
    """(VM, its arguments, max error relative to the output's largest magnitude) of one conv."""
    import numpy as np
    import torch
    import tvm
    from torch import nn
    from tvm import relax

    from legoc.targets.build import build_module
    from legoc.targets.schedules import winograd as wg
    from legoc.targets.table import get_target

    saved = wg.MIN_CHANNELS, wg.MAX_FILTER_BYTES_PER_TILE
    wg.MIN_CHANNELS, wg.MAX_FILTER_BYTES_PER_TILE = (1, 1 << 40) if winograd else (1 << 30, 0)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU()).eval()
        x = torch.randn(1, cin, hw, hw)
        name = f"{cin}x{cout}x{hw}-{'wino' if winograd else 'direct'}"
        built = build_module(model, (x,), get_target("host"), folder / f"{name}.so", prepack=True)
    finally:
        wg.MIN_CHANNELS, wg.MAX_FILTER_BYTES_PER_TILE = saved
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy())] + [tvm.runtime.tensor(p) for p in built.params]
    out = vm["main"](*args).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    err = float(np.abs(out - ref).max()) / float(np.abs(ref).max())
    vm.set_input("main", *args)
    return vm, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=100, help="calls per round")
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated CINxCOUTxHW")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    import tvm
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"3x3 stride-1 conv + bias + ReLU, {args.threads} thread(s), ms per call "
                        f"(medians of {args.rounds} rounds x {args.number} calls)")
    for col in ("CIN x COUT x HW", "direct", "winograd", "winograd / direct paired", "max rel. error (direct, wino)"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            cin, cout, hw = (int(v) for v in shape.split("x"))
            console.print(f"{shape}: building")
            direct, err_d = build(cin, cout, hw, False, Path(tmp))
            wino, err_w = build(cin, cout, hw, True, Path(tmp))
            times = {"d": [], "w": []}
            for _ in range(args.rounds):
                for key, vm in (("d", direct), ("w", wino)):
                    ev = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=args.number, repeat=1)
                    times[key].append(ev("main").mean * 1e3)
            ratio = statistics.median(w / d for w, d in zip(times["w"], times["d"]))
            table.add_row(shape, f"{statistics.median(times['d']):.3f}", f"{statistics.median(times['w']):.3f}",
                          f"{ratio:.2f}x", f"{err_d:.1e}, {err_w:.1e}")
    console.print(table)


if __name__ == "__main__":
    main()
