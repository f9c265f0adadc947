"""What a switch costs: swapping one block vs loading the whole model, and reconfiguring with
everything cached.

    .venv/bin/python benchmarks/switch.py [--artifact out/mnist-host.lego | --model M.py [--blocks K]] [--repeat 20]

* whole reload: a new ``legoc.runtime.load(ART).configure(variants)`` (TVM already imported), i.e.
  what an app does without legoc: read, verify and load every module and weight;
* one-block swap: ``configure`` changing one block to a variant not loaded yet (fresh Model per
  measurement, with the rest already loaded);
* cached reconfigure: ``configure`` between configurations whose modules are all loaded (p50, p99).
Target (issue 6): one-block swap at least 10x faster than a whole reload. A swap loads one
module where a reload loads all of them, so the ratio is about the model's size over the block's:
near the number of blocks for blocks of equal size; ``--model`` with more blocks shows it grow.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from legoc.runtime import load

ROOT = Path(__file__).resolve().parent.parent


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="a host artifact (default: compile examples/mnist_resnet.py)")
    ap.add_argument("--model", help="compile this model.py instead (ratios 0 and 0.5, no retraining)")
    ap.add_argument("--blocks", type=int, help="with --model: the number of blocks")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        art = args.artifact
        if art is None:
            from legoc.pipeline import CompileConfig, compile_model

            art = Path(tmp) / "model.lego"
            if args.model:
                cfg = CompileConfig(output=art, progress=False, ratios=(0.0, 0.5), blocks=args.blocks,
                                    retrain_epochs=0, validate=False)
                compile_model(Path(args.model), cfg)
            else:
                compile_model(ROOT / "examples" / "mnist_resnet.py", CompileConfig(output=art, progress=False))
        probe = load(art).configure()           # imports TVM once, outside the measurements
        n, k = len(probe.blocks), len(probe.blocks[0].variants)
        x = np.zeros(probe.input_shapes[0], np.float32)
        full = [0] * n

        reload_ms = [_ms(lambda: load(art).configure(variants=full)) for _ in range(args.repeat)]
        swap_ms, swap_est, per_block = [], [], {}
        for r in range(args.repeat):
            m = load(art).configure(variants=full)
            b = r % n
            new = list(full)
            new[b] = 1 + r % (k - 1)
            swap_ms.append(_ms(lambda: m.configure(variants=new)))
            per_block.setdefault(b, []).append(swap_ms[-1])
            swap_est.append(m.profiles.switch_ms(full, new))
            assert m.last_switch_loaded == 1
        m = load(art)
        configs = [[i] * n for i in range(k)] + [[(i + b) % k for b in range(n)] for i in range(k)]
        for c in configs:
            m.configure(variants=c)
        loaded = m.modules_loaded
        cached_ms = [_ms(lambda c=c: m.configure(variants=c)) for _ in range(10) for c in configs]
        assert m.modules_loaded == loaded
        m(x)
        budget_ms = []
        if m.profiles.baseline is not None:   # an accuracy profile: selection by budget works
            lo, hi = m.profiles.latency_ms([k - 1] * n), m.profiles.latency_ms([0] * n)
            budgets = [lo + f * (hi - lo) for f in (1.0, 0.7, 0.4, 0.2, 0.05)]
            m.select(latency_ms=hi * 2)   # import OR-Tools outside the measurement
            budget_ms = [_ms(lambda lat=lat: m.configure(latency_ms=lat)) for _ in range(5) for lat in budgets]
    whole, one = statistics.median(reload_ms), statistics.median(swap_ms)
    print(f"whole-model reload (load + configure, {n} blocks): median {whole:.2f} ms")
    print(f"one-block swap (module not loaded yet): median {one:.2f} ms -> {whole / one:.1f}x faster than a reload "
          f"(target: >= 10x)")
    print("  per block: " + ", ".join(f"{probe.blocks[b].name} {statistics.median(t):.2f} ms ({whole / statistics.median(t):.1f}x)"
                                     for b, t in sorted(per_block.items())))
    if None not in swap_est:
        print(f"estimated one-block switch (manifest load_ms): median {statistics.median(swap_est):.2f} ms")
    print(f"reconfigure with every module cached: median {statistics.median(cached_ms):.3f} ms, "
          f"p99 {percentile(cached_ms, 99):.3f} ms ({len(cached_ms)} switches)")
    if budget_ms:
        print(f"reconfigure by latency budget (CP-SAT + switch, modules cached after the first round): median "
              f"{statistics.median(budget_ms):.2f} ms, p99 {percentile(budget_ms, 99):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
