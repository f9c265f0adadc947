"""Accuracy of every variant before and after block-distillation retraining, and its cost.

    .venv/bin/python benchmarks/retrain.py [--model examples/mnist_resnet.py] [--epochs 10] [--nested]

For every block and ratio: validation accuracy (the model file's evaluate() on val_data()) of
the model with that one block replaced, (a) pruned with BN recalibration only, (b) retrained.
Then the same ratio in every block. Prints the retraining time. With --nested: nested variants
(one weight set per block; before = untrained prefixes, after = incremental group training), and
the weight storage of all variants of a block against the full block.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from legoc.modelfile import load_model_file
from legoc.passes import PassManager, ProgramState
from legoc.pipeline import CompileConfig, default_pipeline, train_batches

ROOT = Path(__file__).resolve().parent.parent


class Assembled(torch.nn.Module):
    """The partitioned model with some blocks replaced by variants (for evaluate())."""

    def __init__(self, partition, replace):
        super().__init__()
        self.partition, self.replace = partition, replace

    def forward(self, *x):
        return self.partition.run(*x, replace=self.replace)


def run(spec, cfg):
    state = ProgramState(model=spec.model, example_inputs=spec.example_inputs, source=str(spec.path),
                         **train_batches(spec))
    pm = PassManager(default_pipeline())
    state = pm(state, cfg).state
    return state, {t.name: t.seconds for t in pm.timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "mnist_resnet.py"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--nested", action="store_true")
    ap.add_argument("--importance", default="l1", help="l1, bn or taylor")
    args = ap.parse_args()
    spec = load_model_file(args.model)   # (its trained weights come from the usual cache)
    # measure retraining itself: an empty retraining cache, not results of an earlier compile
    os.environ["LEGOC_CACHE"] = tempfile.mkdtemp(prefix="legoc-bench-cache-")
    val = spec.val_data()
    base = spec.evaluate(spec.model, val)
    before, _ = run(spec, CompileConfig(retrain_epochs=0, progress=False, nested=args.nested,
                                        importance=args.importance))
    after, timing = run(spec, CompileConfig(retrain_epochs=args.epochs, retrain_minutes=args.minutes, progress=True,
                                            nested=args.nested, importance=args.importance))
    part = after.partition
    ratios = [v.ratio for v in after.variants[part.blocks[0].name]]

    def before_full(block):
        from legoc.passes.analysis import param_bytes

        return param_bytes(block.gm)

    def acc(state, replace):
        return spec.evaluate(Assembled(state.partition, replace), val)

    kind = ("nested: before = untrained prefixes (BN folded), after = incremental group training" if args.nested
            else "before = pruned + BN recalibration, after = retrained")
    t = Table(title=f"{spec.path.name}: val accuracy with one block replaced (original {base:.1%}); {kind}")
    t.add_column("block")
    first = 0 if args.nested else 1   # nested: the full-size variant is retrained too (its new group)
    for r in ratios[first:]:
        t.add_column(f"r{r:.1f} before", justify="right")
        t.add_column(f"r{r:.1f} after", justify="right")
    for block in part.blocks:
        row = [block.name]
        for i in range(first, len(ratios)):
            row.append(f"{acc(before, {block.name: before.variants[block.name][i].gm}):.1%}")
            row.append(f"{acc(after, {block.name: after.variants[block.name][i].gm}):.1%}")
        t.add_row(*row)
    row = ["all blocks"]
    for i in range(first, len(ratios)):
        row.append(f"{acc(before, {b.name: before.variants[b.name][i].gm for b in part.blocks}):.1%}")
        row.append(f"{acc(after, {b.name: after.variants[b.name][i].gm for b in part.blocks}):.1%}")
    t.add_row(*row)
    con = Console(width=160)
    con.print(t)
    epochs = sorted({r["epochs"] for r in (after.retrain_report or {}).values()})
    if args.nested:
        for b in part.blocks:
            vs = after.variants[b.name]
            con.print(f"{b.name}: one shared weight set of {vs[0].param_bytes / 1024:.1f} KiB serves {len(vs)} variants; "
                      f"separate copies would take {sum(v.param_bytes for v in vs) / 1024:.1f} KiB "
                      f"({sum(v.param_bytes for v in vs) / vs[0].param_bytes:.2f}x); the unfolded block has "
                      f"{before_full(b) / 1024:.1f} KiB")
    con.print(f"retraining: {timing['retrain']:.1f} s for {len(after.retrain_report or {})} variants "
              f"(epochs run: {epochs}; limit {args.epochs} epochs / {args.minutes} min), "
              f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
