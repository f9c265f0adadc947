"""Device-side demo: run a compiled legoc MNIST artifact at three variant choices.

    python examples/demo_app.py out/mnist-host.lego [--limit N]

For each configuration (every block at its full variant, at its middle variant, at its smallest
variant) it prints the chosen pruning ratios, total MACs, top-1 accuracy on the 1,000 test
digits (batch-1 inference; the test split, which `legoc compile` never reads) and the median latency per inference. Then it follows a budget that
changes over time: at every step the runtime picks the most accurate variants within the
latency (and memory) budget with CP-SAT, loading only the blocks that change.

Device-side: imports numpy, legoc.runtime and mnist_digits only; never torch.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mnist_digits, whatever the cwd
import mnist_digits  # noqa: E402

WARMUP = 3  # untimed inferences per configuration (first calls load modules and warm caches)


def configurations(blocks) -> list[tuple[str, list[int]]]:
    """The three demo configurations as (name, one variant index per block)."""
    return [
        ("full", [0 for _ in blocks]),
        ("middle", [len(b.variants) // 2 for b in blocks]),
        ("smallest", [len(b.variants) - 1 for b in blocks]),
    ]


def describe_ratios(ratios: list[float]) -> str:
    """'all 0.50' when every block has the same ratio, else the per-block list."""
    if ratios and all(r == ratios[0] for r in ratios):
        return f"all {ratios[0]:.2f}"
    return " ".join(f"{r:.2f}" for r in ratios)


def _logits(out) -> np.ndarray:
    if isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out).reshape(-1)


def run_config(model, variants: list[int], x: np.ndarray, y: np.ndarray) -> dict:
    """Configure ``model``, run every digit at batch 1, return accuracy and latency stats."""
    model.configure(variants=variants)
    chosen = [b.variants[i] for b, i in zip(model.blocks, variants)]
    # Segments outside the blocks (stem, head: the "frame") always run their single variant.
    fixed = [s.variants[0] for s in getattr(model, "frame", ()) if s.variants]
    for i in range(min(WARMUP, len(x))):
        model(x[i:i + 1])
    correct, times = 0, []
    for i in range(len(x)):
        xi = x[i:i + 1]
        t0 = time.perf_counter()
        out = model(xi)
        times.append(time.perf_counter() - t0)
        correct += int(np.argmax(_logits(out)) == y[i])
    return {
        "ratios": [float(v.ratio) for v in chosen],
        "macs": sum(int(v.macs) for v in chosen + fixed),
        "param_bytes": sum(int(v.param_bytes) for v in chosen + fixed),
        "accuracy": correct / max(len(x), 1),
        "median_ms": statistics.median(times) * 1e3 if times else float("nan"),
    }


def run(model, x: np.ndarray, y: np.ndarray) -> list[tuple[str, dict]]:
    expected = tuple(model.input_shapes[0])
    if tuple(x.shape[1:]) != tuple(expected[1:]):
        raise SystemExit(f"demo_app: the artifact takes input {expected}, but the test digits "
                         f"are {(1,) + tuple(x.shape[1:])}; compile examples/mnist_resnet.py")
    return [(name, run_config(model, v, x, y)) for name, v in configurations(model.blocks)]


def print_table(rows: list[tuple[str, dict]], title: str) -> None:
    header = ("config", "variant ratios", "MMACs", "params KB", "accuracy", "median ms")
    cells = [(name, describe_ratios(r["ratios"]), f"{r['macs'] / 1e6:.2f}",
              f"{r['param_bytes'] / 1024:.1f}", f"{r['accuracy'] * 100:.1f}%",
              f"{r['median_ms']:.3f}") for name, r in rows]
    _print_cells(header, cells, title, left=2)


def _print_cells(header, cells, title: str, left: int) -> None:
    """A table with rich, or plain aligned text on devices without it (first ``left`` columns
    left-aligned, the rest right-aligned)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        print(title)
        for line in [header, *cells]:
            print("  ".join(s.ljust(w) if i < left else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))))
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < left else "right")
    for c in cells:
        table.add_row(*c)
    Console(width=max(120, Console().width)).print(table)


# (what happens on the device, latency budget, memory budget or None). Budgets are fractions of
# the artifact's own range, so the trace means the same on a fast and a slow machine: latency
# 0 = the fastest combination, 1 = the full model (above 1: slack); memory likewise.
BUDGET_TRACE = [
    ("idle board", 1.5, None),
    ("camera app starts", 0.7, None),
    ("board heats up", 0.4, None),
    ("battery saver", 0.05, None),
    ("memory pressure", 0.7, 0.3),
    ("back to idle", 1.5, None),
]


def budgets(model, trace=BUDGET_TRACE) -> list[tuple[str, float, float | None]]:
    """The trace in ms and MiB for ``model``, from its estimated latency and memory range."""
    prof = model.profiles
    full = [0] * len(model.blocks)
    fast, slow = prof.min_latency_ms(), prof.latency_ms(full)
    small = prof.memory_bytes([min(range(len(vs)), key=lambda i: prof.memory_of([vs[i]])) for vs in prof.blocks])
    big = prof.memory_bytes(full)
    up = lambda v: math.ceil(v * 100) / 100   # noqa: E731 - two decimals, never below the range
    return [(event, up(fast + lat * (slow - fast)), None if mem is None else up((small + mem * (big - small)) / 2**20))
            for event, lat, mem in trace]


def follow_budget(model, x: np.ndarray, y: np.ndarray, trace=BUDGET_TRACE, limit: int = 300) -> list[dict]:
    """Reconfigure by budget at every step (CP-SAT), then measure what the chosen configuration does."""
    rows = []
    x, y = x[:limit], y[:limit]
    for event, latency_ms, memory_mb in budgets(model, trace):
        loaded_before = model.modules_loaded
        t0 = time.perf_counter()
        model.configure(latency_ms=latency_ms, memory_mb=memory_mb)
        switch_ms = (time.perf_counter() - t0) * 1e3
        sel = model.last_selection
        for i in range(WARMUP):
            model(x[i:i + 1])
        correct, times = 0, []
        for i in range(len(x)):
            t1 = time.perf_counter()
            out = model(x[i:i + 1])
            times.append(time.perf_counter() - t1)
            correct += int(np.argmax(_logits(out)) == y[i])
        rows.append({"event": event, "latency_budget": latency_ms, "memory_budget": memory_mb,
                     "choice": list(sel.choice), "est_accuracy": sel.estimate.accuracy,
                     "est_latency_ms": sel.estimate.latency_ms, "est_memory_mb": sel.estimate.memory_bytes / 2**20,
                     "accuracy": correct / len(x), "median_ms": statistics.median(times) * 1e3,
                     "loaded": model.modules_loaded - loaded_before, "switch_ms": switch_ms, "solve_ms": sel.solve_ms})
    return rows


def print_trace(rows: list[dict], title: str) -> None:
    header = ("step", "budget", "variants", "est. acc", "acc", "est. ms", "ms", "modules loaded", "switch ms")
    cells = [(r["event"], f"≤{r['latency_budget']:g} ms" + (f", ≤{r['memory_budget']:g} MiB" if r["memory_budget"] else ""),
              " ".join(map(str, r["choice"])), f"{r['est_accuracy'] * 100:.1f}%", f"{r['accuracy'] * 100:.1f}%",
              f"{r['est_latency_ms']:.2f}", f"{r['median_ms']:.2f}", str(r["loaded"]), f"{r['switch_ms']:.1f}")
             for r in rows]
    _print_cells(header, cells, title, left=3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", help="a .lego artifact compiled from examples/mnist_resnet.py")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N test digits")
    args = ap.parse_args(argv)

    from legoc.errors import UserError
    from legoc.runtime import load

    # Reported accuracy comes from the test split only: compile measured its drops on val.
    x_test, y_test = mnist_digits.load_splits()["test"]
    if args.limit is not None:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    try:
        model = load(args.artifact)
        print(f"{args.artifact}: {len(model.blocks)} blocks, variants per block "
              f"{[len(b.variants) for b in model.blocks]}, input {list(model.input_shapes[0])}")
        rows = run(model, x_test, y_test)
    except UserError as exc:
        print(f"demo_app: {exc}", file=sys.stderr)
        return 1
    print_table(rows, f"{Path(args.artifact).name} on {len(x_test)} test MNIST digits (batch 1)")
    if not hasattr(model, "select"):   # a runtime without budget selection
        return 0
    try:
        trace = follow_budget(model, x_test, y_test, limit=min(300, len(x_test)))
    except UserError as exc:
        print(f"demo_app: {exc}", file=sys.stderr)
        return 1
    print_trace(trace, f"following a changing budget: CP-SAT picks the variants at each step "
                       f"(accuracy and latency measured on {min(300, len(x_test))} test digits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
