"""The early part of ResNet-18 across loopback TVM RPC workers: plans chosen from measurements
against fixed alternatives, estimate vs measurement, on the machine's loopback and behind a
100 Mbit/s link (issue 19).

    .venv/bin/python benchmarks/cluster.py [--size 224] [--layers 2] [--calls 10] [--links loopback,shaped]
        [--qemu] [--cold] [--no-pin-master]

The model: the torchvision ResNet-18 architecture (random weights) cut into blocks: the stem
(7x7/2 conv-BN-ReLU, 3x3/2 max pool) and ``--layers`` stages of two basic blocks, at ``--size``
x ``--size``, batch 1. Every block is compiled whole for the host by legoc's back end (prepacked
weights). Two loopback TVM RPC servers (legoc.runtime.cluster.LocalWorkers) are started, each
pinned to its own core with taskset and running one thread; the master (this process) also runs
TVM with one thread. Per link:

1. measure (legoc.runtime.cluster_plan): each worker's link (round trip, bandwidth), each block's
   seconds on each worker (both timed at once) and on the master;
2. plan: every run of consecutive blocks is a candidate (each block alone, stages joined, all
   joined), local or tiled with the rows the exact DP gives it; and the same with the master
   not computing ("plan, workers only": a thin client handing the model to its boards);
3. run the plans and fixed alternatives (all local; one worker; two workers with equal rows, the
   blocks joined into one tiled unit or tiled per block), each compiled by
   legoc.passes.tiling.compile_plan, all held by one cluster and called in turn (so that a
   change of load on the machine hits them alike): median of ``--calls`` calls end to end
   (warm-up first), the model's estimate for the same steps, bytes moved per call, what the
   busiest worker holds for its largest tile (weights plus input and output bands), the largest
   difference from torch.

``shaped``: a network namespace whose loopback is shaped with ``tc ... tbf rate 100mbit``
(legoc.runtime.cluster.ShapedLoopback; root and iproute2 needed, else skipped with the reason);
master and workers run inside it. The workers share this 2-core machine with anything else on it.
The master talks to worker w from a thread pinned to worker w's core (``--no-pin-master``: any
core). ``--cold``: the workers' block seconds are timed with the weights flushed from the caches.

``--qemu``: a heterogeneous pair, a host worker and an aarch64 TVM RPC server under qemu-user
(``--qemu-size``, ``--qemu-layers``), the joined blocks compiled for host and raspberry-pi-4; the
exact row DP's split against equal rows (the slow node's share shrinks).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"  # the master is a one-core device too (before TVM loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from resnet_layers import BasicBlock  # noqa: E402

from legoc.passes.tiling import compile_plan, join, row_profile  # noqa: E402
from legoc.runtime.cluster import Cluster, LocalWorkers, ShapedLoopback, TileModule  # noqa: E402
from legoc.runtime.cluster_plan import (LocalModule, Plan, PlanRunner, chain_candidates, equal_rows,  # noqa: E402
                                        measure_links, measure_local, measure_workers, plan_chain, step_seconds)
from legoc.targets.build import build_module  # noqa: E402
from legoc.targets.table import TARGETS  # noqa: E402


def resnet18_blocks(layers: int) -> list[nn.Module]:
    """The stem and ``layers`` stages of ResNet-18, one module each."""
    blocks = [nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                            nn.MaxPool2d(3, 2, 1))]
    cin = 64
    for i, ch in enumerate((64, 128, 256, 512)[:layers]):
        blocks.append(nn.Sequential(BasicBlock(cin, ch, 1 if i == 0 else 2), BasicBlock(ch, ch)))
        cin = ch
    return [b.eval() for b in blocks]


def fixed_plans(cands, links, n: int) -> dict[str, Plan]:
    """The alternatives the chosen plan is compared with, estimated by the same model."""
    by_run = {(c.first, c.last): c for c in cands}
    whole = by_run[0, n]

    def tiled(c, k):
        return step_seconds(c, links, [(w, a, b) for w, (a, b) in enumerate(equal_rows(c.profile.height, k))])

    return {
        "all local": Plan((step_seconds(whole, links),)),
        "1 worker": Plan((tiled(whole, 1),)),
        "2 workers, joined, equal rows": Plan((tiled(whole, 2),)),
        "2 workers, per block, equal rows": Plan(tuple(tiled(by_run[i, i + 1], 2) for i in range(n))),
    }


def plan_bytes(plan: Plan, profiles) -> int:
    return sum(profiles[s.first, s.last].band_bytes(a, b) for s in plan.steps for _, a, b in s.tiles)


def worker_bytes(plan: Plan, steps, profiles) -> int:
    """The most one worker holds for its largest tile: the tile's weights plus its input band (halo
    included) and output band; 0 when the plan sends nothing to the workers."""
    most = 0
    for s, per_worker in zip((s for s in plan.steps if not s.local), steps):
        for w, a, b in s.tiles:
            tile = per_worker[w] if 0 <= w < len(per_worker) else None
            weights = sum(int(np.asarray(v).nbytes) for v in tile.weights) if tile is not None else 0
            most = max(most, weights + profiles[s.first, s.last].band_bytes(a, b))
    return most


def describe(plan: Plan) -> str:
    parts = []
    for s in plan.steps:
        what = f"{s.first}" if s.last - s.first == 1 else f"{s.first}-{s.last - 1}"
        rows = "local" if s.local else " ".join(f"w{w}:{a}-{b}" for w, a, b in s.tiles)
        parts.append(f"[{what}] {rows}")
    return "; ".join(parts)


def bench_link(link_name, ctx, gms, x, ref, whole, inputs, profiles, args, folder, cache, rows):
    """Measure, plan and time every plan on one link (``ctx``: the namespace to run in, or none)."""
    n = len(gms)
    with ctx, LocalWorkers(2, threads=1) as workers:
        cores = workers.worker_cores if args.pin_master else None
        links = measure_links(workers.addresses, nbytes=1 << 20, repeat=5, cores=cores)
        per_block_workers = measure_workers(workers.addresses, whole, inputs, number=1 if args.cold else 3,
                                            repeat=9 if args.cold else 3, cores=cores, cold=args.cold)
        local = measure_local(whole, inputs, number=3, repeat=3)
        print(f"[{link_name}] links: " + ", ".join(
            f"rtt {k.rtt * 1e3:.2f} ms, shared {k.bandwidth / 1e6:.1f} MB/s, own {k.own_bandwidth / 1e6:.1f} MB/s"
            for k in links))
        print(f"[{link_name}] block ms on worker 0 / worker 1 / master: "
              + "; ".join(f"{w[0] * 1e3:.1f} / {w[1] * 1e3:.1f} / {m * 1e3:.1f}" for w, m in zip(per_block_workers, local)))
        cands = chain_candidates(n, lambda i, j: profiles[i, j], local, per_block_workers)
        t0 = time.perf_counter()
        chosen = plan_chain(n, cands, links)
        solve_ms = (time.perf_counter() - t0) * 1e3
        print(f"[{link_name}] plan (solved in {solve_ms:.0f} ms):\n  " + chosen.describe().replace("\n", "\n  "))
        # the same, when the master must not compute (a thin client handing the model to its boards)
        remote = plan_chain(n, chain_candidates(n, lambda i, j: profiles[i, j], [None] * n, per_block_workers), links)
        print(f"[{link_name}] plan, workers only:\n  " + remote.describe().replace("\n", "\n  "))
        plans = {"plan": chosen, **fixed_plans(cands, links, n), "plan, workers only": remote}
        # every plan's steps on one cluster (one session per worker holds them all), so that the
        # plans' calls can alternate: a change of load on the machine hits them all alike
        all_steps, runners, held = [], {}, {}
        for label, plan in plans.items():
            steps, local_modules = compile_plan(plan, gms, x, TARGETS["host"], folder, 2, cache=cache)
            held[label] = worker_bytes(plan, steps, profiles)
            runners[label] = PlanRunner(plan, None, {i: LocalModule(m) for i, m in local_modules.items()},
                                        first_step=len(all_steps))
            all_steps += steps
        times: dict[str, list[float]] = {label: [] for label in plans}
        outs = {}
        with Cluster(workers.addresses, steps=all_steps, timeout=120, cores=cores) as cluster:
            for runner in runners.values():
                runner.cluster = cluster
            for label, runner in runners.items():  # warm-up
                outs[label] = runner(x.numpy())
            for _ in range(args.calls):
                for label, runner in runners.items():
                    t = time.perf_counter()
                    outs[label] = runner(x.numpy())
                    times[label].append(time.perf_counter() - t)
        for label, plan in plans.items():
            rows.append(dict(link=link_name, label=label, steps=describe(plan), estimate=plan.seconds,
                             measured=statistics.median(times[label]), moved=plan_bytes(plan, profiles),
                             held=held[label],
                             diff=float(np.abs(outs[label] - ref).max())))
            r = rows[-1]
            print(f"[{link_name}] {label}: {describe(plan)}: estimate {r['estimate'] * 1e3:.1f} ms, "
                  f"measured {r['measured'] * 1e3:.1f} ms", flush=True)


def bench_qemu(args, folder: Path) -> None:
    """A heterogeneous pair: a host worker (core 0) and an aarch64 TVM RPC server under qemu-user
    (core 1, legoc.targets.emulation), the joined blocks compiled for each worker's target (host;
    raspberry-pi-4). Each worker's seconds for the whole run and its link are measured, the exact
    row DP splits the rows, and the chosen split is run against equal rows."""
    from legoc.passes.tiling import compile_tiles, tile_plan
    from legoc.runtime.cluster_plan import Candidate, best_rows
    from legoc.targets import emulation

    torch.manual_seed(0)
    gms = [torch.fx.symbolic_trace(b) for b in resnet18_blocks(args.qemu_layers)]
    x = torch.randn(1, 3, args.qemu_size, args.qemu_size)
    with torch.no_grad():
        run = join(gms, x) if len(gms) > 1 else gms[0]
        ref = run(x).numpy()
    prof = row_profile(run, x)
    targets = [TARGETS["host"], TARGETS["raspberry-pi-4"]]
    whole = []
    for k, target in enumerate(targets):
        built = build_module(run, (x,), target, folder / f"qemu-whole-{k}.so", name=f"whole for {target.name}")
        whole.append(TileModule(built.path, tuple(built.params), (0, x.shape[2]), (0, prof.height)))
    emu = emulation.setup(log=print)
    with LocalWorkers(1, cores=[0]) as host, LocalWorkers(1, cores=[1], python=emu.command(), env=emu.env()) as arm:
        addresses, cores = host.addresses + arm.addresses, [0, 1]
        seconds = [measure_workers(a, [m], [x.numpy()], number=1, repeat=3, timeout=600)[0][0]
                   for a, m in zip(addresses, whole)]
        links = measure_links(addresses, nbytes=1 << 18, repeat=3, cores=cores, timeout=600)
        print(f"[qemu] whole run on the host worker {seconds[0] * 1e3:.1f} ms, on the aarch64 qemu worker "
              f"{seconds[1] * 1e3:.1f} ms; links: " + ", ".join(
                  f"rtt {k.rtt * 1e3:.2f} ms, shared {k.bandwidth / 1e6:.1f} MB/s, own {k.own_bandwidth / 1e6:.1f} MB/s"
                  for k in links))
        cand = Candidate(0, len(gms), None, tuple(seconds), prof)
        chosen = best_rows(cand, links)
        equal = step_seconds(cand, links, [(w, a, b) for w, (a, b) in enumerate(equal_rows(prof.height, 2))])
        for label, step in (("chosen", chosen), ("equal rows", equal)):
            rows_of = {w: (a, b) for w, a, b in step.tiles}
            used = [w for w in range(2) if w in rows_of]
            plan = tile_plan(run, x, rows=[rows_of[w] for w in used])
            tiles: list = [None, None]
            for i, w in enumerate(used):  # each worker's tile for its own target (both compiled per target)
                sub = folder / f"qemu-{label.replace(' ', '')}-{w}"
                sub.mkdir(exist_ok=True)
                tiles[w] = compile_tiles(plan, x, targets[w], sub)[i]
            with Cluster(addresses, steps=[tiles], timeout=600, cores=cores) as cluster:
                out = cluster(x.numpy())
                times = []
                for _ in range(args.qemu_calls):
                    t0 = time.perf_counter()
                    out = cluster(x.numpy())
                    times.append(time.perf_counter() - t0)
            share = {w: (b - a) / prof.height for w, (a, b) in rows_of.items()}
            print(f"[qemu] {label}: host worker {share.get(0, 0) * 100:.0f}% of rows, qemu worker "
                  f"{share.get(1, 0) * 100:.0f}%; estimate {step.seconds * 1e3:.1f} ms, measured "
                  f"{statistics.median(times) * 1e3:.1f} ms (median of {len(times)}); max abs diff "
                  f"{float(np.abs(out - ref).max()):.1e}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--layers", type=int, default=2, help="ResNet-18 stages after the stem (1-4)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--links", default="loopback,shaped")
    ap.add_argument("--qemu", action="store_true", help="also the heterogeneous pair: host + aarch64 under qemu")
    ap.add_argument("--qemu-size", type=int, default=112)
    ap.add_argument("--qemu-layers", type=int, default=1)
    ap.add_argument("--qemu-calls", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="time blocks on the workers with the weights flushed from the caches before each run "
                         "(default: warm, TVM's time evaluator as is)")
    ap.add_argument("--no-pin-master", dest="pin_master", action="store_false",
                    help="let the master's thread for each worker run on any core (default: on that worker's core)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    gms = [torch.fx.symbolic_trace(b) for b in resnet18_blocks(args.layers)]
    n = len(gms)
    x = torch.randn(1, 3, args.size, args.size)
    inputs, cur = [], x
    with torch.no_grad():
        for g in gms:
            inputs.append(cur)
            cur = g(cur)
    ref = cur.numpy()
    profiles = {(i, j): row_profile(gms[i] if j - i == 1 else join(gms[i:j], inputs[i]), inputs[i])
                for i in range(n) for j in range(i + 1, n + 1)}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        whole = []
        with torch.no_grad():
            for i, (g, xi) in enumerate(zip(gms, inputs)):
                built = build_module(g, (xi,), TARGETS["host"], folder / f"block{i}.so", name=f"block {i}")
                whole.append(TileModule(built.path, tuple(built.params), (0, xi.shape[2]), (0, g(xi).shape[2])))
        print(f"compiled {n} blocks whole in {time.perf_counter() - t0:.0f} s")
        np_inputs = [xi.numpy() for xi in inputs]
        cache: dict = {}
        for link_name in [name for name in args.links.split(",") if name]:  # --links "": none
            if link_name == "loopback":
                ctx = nullcontext()
            elif link_name == "shaped":
                why = ShapedLoopback.unavailable()
                if why:
                    print(f"[shaped] skipped: {why}")
                    continue
                shaped = ShapedLoopback("100mbit")
                shaped.__enter__()
                ctx = shaped.inside()
            else:
                raise SystemExit(f"unknown link {link_name!r}: loopback or shaped")
            try:
                bench_link(link_name, ctx, gms, x, ref, whole, np_inputs, profiles, args, folder, cache, rows)
            finally:
                if link_name == "shaped":
                    shaped.__exit__()
        if args.qemu:
            bench_qemu(args, folder)
    if not rows:
        return

    print(f"\nResNet-18 stem + {args.layers} stage(s) at {args.size}x{args.size}, batch 1; blocks: "
          f"0 = stem, 1-{args.layers} = stages; 2 loopback TVM RPC workers (1 thread, taskset-pinned) and the "
          f"master (1 thread); median of {args.calls} calls; speedup over '1 worker' on the same link\n")
    print("| link | plan | steps (block: worker rows) | estimate ms | measured ms | estimate error | speedup | "
          "bytes moved / call | largest worker: weights + bands | max abs diff |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(q["measured"] for q in rows if q["link"] == r["link"] and q["label"] == "1 worker")
        err = (r["estimate"] - r["measured"]) / r["measured"] * 100
        print(f"| {r['link']} | {r['label']} | {r['steps']} | {r['estimate'] * 1e3:.1f} | {r['measured'] * 1e3:.1f} | "
              f"{err:+.0f}% | {base / r['measured']:.2f}x | {r['moved'] / 1e6:.2f} MB | "
              f"{r['held'] / 1e6:.2f} MB | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
