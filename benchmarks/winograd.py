"""Where Winograd F(4x4, 3x3) pays: one 3x3 stride-1 conv (+ bias + ReLU) built as the direct
packed conv and as Winograd, timed in alternating rounds, for a list of shapes.

    .venv/bin/python benchmarks/winograd.py [--threads 2] [--rounds 5] [--number 100]
                                            [--shapes 64x64x56,16x64x56,...]
    .venv/bin/python benchmarks/winograd.py --blocks resnet18-224 [--ratios 0,0.25,0.5,0.75]

Each shape ``CINxCOUTxHW`` is built twice with ``build_module(prepack=True)`` (as legoc's
artifacts are): once with the Winograd rewrite forced on (its thresholds
``MIN_CHANNELS``/``MAX_FILTER_BYTES_PER_TILE`` moved to take the shape) and once forced off (the direct
packed conv). Both outputs are checked against PyTorch. Then each module runs
``--number`` calls per round (TVM's time evaluator, VM ``invoke_stateful``), the two
alternating for ``--rounds`` rounds; the table gives each one's median over rounds and their
ratio paired per round. The thresholds in ``legoc.targets.schedules.winograd`` come from this
table; ``TVM_NUM_THREADS`` is set from ``--threads`` before TVM starts.

``--blocks MODEL`` (a name ``benchmarks/inference.py --models`` takes: a zoo model such as
``resnet18-224`` or an example such as ``mnist_resnet``): every block
variant ``legoc compile`` would make at ``--ratios`` (its partition, its pruning with the host's
channel rounding; no retraining), each built as artifacts build it (``prepack=True``) with
Winograd on (the default thresholds decide which convs take it) and off (``--no-winograd``),
checked against PyTorch and timed in alternating rounds like the convs. Per variant: both
times, their ratio paired per round, and the pruning efficiency of each build against its own
block's full variant, (time full / time variant) / (MACs full / MACs variant), paired per round.
It shows what Winograd does to the efficiency figure: it speeds a full block more than a pruned
one, whose convs keep the transform of their unpruned side.
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
    """(VM with its inputs set, max error relative to the output's largest magnitude) of one conv."""
    import torch
    from torch import nn

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
    return _loaded(built, model, x)


def _loaded(built, model, x):
    """(VM of ``built`` with its inputs set, max error against ``model(x)`` relative to the
    output's largest magnitude)."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy())] + [tvm.runtime.tensor(np.asarray(p)) for p in built.params]
    out = vm["main"](*args).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    vm.set_input("main", *args)
    return vm, float(np.abs(out - ref).max()) / float(np.abs(ref).max())


def block_variants(model_name: str, ratios: tuple[float, ...]):
    """[(block name, ratio, MACs, GraphModule, its example input)] as ``legoc compile`` prunes
    the model's blocks for the host (no retraining)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import model_file  # noqa: PLC0415 - benchmarks/inference.py's zoo models

    from legoc.modelfile import load_model_file
    from legoc.passes.capture import annotate_shapes, trace
    from legoc.passes.partition import partition
    from legoc.passes.prune import prune_block
    from legoc.targets.table import channel_multiple, get_target

    with tempfile.TemporaryDirectory() as work:
        spec = load_model_file(model_file(model_name, Path(work)))
    inputs = tuple(spec.example_inputs)
    gm = trace(spec.model.eval())
    annotate_shapes(gm, inputs)
    part = partition(gm)
    with torch.no_grad():
        env = part.trace_env(*inputs)
    round_to = channel_multiple(get_target("host"))
    out = []
    for block in part.blocks:
        x = env[block.inputs[0]]
        for ratio in ratios:
            v = prune_block(block.gm, x, ratio, round_to=round_to, name=block.name, ratios=ratios)
            out.append((block.name, ratio, v.macs, v.gm, x))
    return out


def build_variant(gm, x, winograd: bool, path: Path):
    """(VM with its inputs set, max error relative to the output's largest magnitude)."""
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    return _loaded(build_module(gm, (x,), get_target("host"), path, prepack=True, winograd=winograd), gm, x)


def block_rows(times: dict, variants: list) -> list[dict]:
    """Per variant: median times of both builds, winograd/direct paired per round, and each
    build's pruning efficiency against its block's full variant (ratio 0, always among
    ``variants``) paired per round.
    ``times[(i, build)]``: one time per round for variant ``i`` (``variants`` order) and build
    "d" or "w"."""
    full = {}
    for i, (block, ratio, macs, *_rest) in enumerate(variants):
        if ratio == 0:
            full[block] = (i, macs)
    rows = []
    for i, (block, ratio, macs, *_rest) in enumerate(variants):
        row = {"block": block, "ratio": ratio, "macs": macs,
               "direct": statistics.median(times[(i, "d")]), "winograd": statistics.median(times[(i, "w")]),
               "paired": statistics.median(w / d for w, d in zip(times[(i, "w")], times[(i, "d")]))}
        if ratio != 0:
            j, full_macs = full[block]
            for key in ("d", "w"):
                row[f"eff_{key}"] = statistics.median(
                    (tf / tv) / (full_macs / macs) for tf, tv in zip(times[(j, key)], times[(i, key)]))
        rows.append(row)
    return rows


def _blocks(args, console) -> None:
    import tvm
    from rich.table import Table

    ratios = tuple(float(r) for r in args.ratios.split(","))
    if 0.0 not in ratios:
        ratios = (0.0, *ratios)
    variants = block_variants(args.blocks, ratios)
    vms, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (block, ratio, _macs, gm, x) in enumerate(variants):
            console.print(f"{block} r{ratio:.2f}: building both ways")
            for key, wino in (("d", False), ("w", True)):
                vms[(i, key)], errors[(i, key)] = build_variant(gm, x, wino, Path(tmp) / f"{block}-{ratio}-{key}.so")
        times: dict = {k: [] for k in vms}
        for r in range(args.rounds):
            console.print(f"round {r + 1}/{args.rounds}")
            for key in vms:
                ev = vms[key].time_evaluator("invoke_stateful", tvm.cpu(), number=args.number, repeat=1)
                times[key].append(ev("main").mean * 1e3)
    table = Table(title=f"{args.blocks}: block variants built direct (--no-winograd) and with Winograd, "
                        f"{args.threads} thread(s), ms per call (medians of {args.rounds} rounds x {args.number} calls)")
    for col in ("block", "variant", "MMAC", "direct", "winograd", "winograd / direct paired",
                "pruning eff. direct", "pruning eff. winograd", "max rel. error (direct, wino)"):
        table.add_column(col, justify="right")
    for i, row in enumerate(block_rows(times, variants)):
        table.add_row(row["block"], f"r{row['ratio']:.2f}", f"{row['macs'] / 1e6:.1f}", f"{row['direct']:.3f}",
                      f"{row['winograd']:.3f}", f"{row['paired']:.2f}x",
                      f"{row['eff_d']:.2f}" if "eff_d" in row else "", f"{row['eff_w']:.2f}" if "eff_w" in row else "",
                      f"{errors[(i, 'd')]:.1e}, {errors[(i, 'w')]:.1e}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=100, help="calls per round")
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated CINxCOUTxHW")
    parser.add_argument("--blocks", metavar="MODEL", help="every block variant of MODEL instead of --shapes")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75", help="with --blocks: the pruning ratios")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT))
    import tvm
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 170) if args.blocks else None)
    if args.blocks:
        _blocks(args, console)
        return
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
