"""Batch-1 inference latency and pruning efficiency: PyTorch eager, ONNX Runtime, one TVM module,
and legoc's runtime at full size and at uniform pruning ratios.

    .venv/bin/python benchmarks/inference.py [--threads 2] [--models mnist_resnet,resnet18-224,mobilenetv2-224]
                                             [--runs 200] [--rounds 20] [--round-to N] [--tune-trials N] [--no-winograd]
                                             [--clock wall|cpu] [--processes N] [--json out.json]

For each model, with the same thread count everywhere, every runner in a process of its own (no
torch OpenMP workers spinning beside TVM, no ORT pool beside either):

* ``pytorch eager``: the PyTorch model (``torch.set_num_threads``);
* ``onnxruntime``: the model exported to ONNX, ORT CPU provider, all graph optimizations;
* ``tvm monolithic``: the whole model compiled by ``legoc.targets.build.build_module`` (legoc's
  CPU schedules, prepacked weights) as one TVM module;
* ``legoc full``: ``legoc compile`` (ratios 0, 0.25, 0.5, 0.75; no retraining; channel rounding
  as ``legoc compile`` does by default, or ``--round-to``; ``--no-winograd`` as ``legoc compile
  --no-winograd``, for the monolithic module too) run block by block by
  ``legoc.runtime``; ``legoc r0.25`` ...: every block at that ratio.

Every runner's process starts once, loads its model and warms up, then waits. Each of
``--rounds`` rounds asks every runner in turn for a batch of ``--runs / --rounds`` timed calls
(numpy in, numpy out; two untimed calls first), one runner at a time, with a pause between
batches for the previous runner's thread pool to stop spinning; odd rounds go in reverse order.
A round takes seconds, so a change of load on this shared machine (slow spells of tens of
seconds) hits the runners of a round alike. The latency is the median over all timed calls and
the spread is the range of the per-round medians; "× ORT paired" (and the overhead's paired
figure) is the median over rounds of the ratio of round medians within one round
(:func:`paired_ratio`).

``--processes N`` starts N processes per runner and round ``r`` asks process ``r % N``: on a VM
one process of a runner can stay faster or slower than another of the same runner for its
whole life (the README's inference tables give this machine's spread), which a single process
per runner carries into every paired figure; with N processes each figure is the median over
N such draws. Use ``--rounds`` a multiple of N.

GFLOP/s counts 2 x legoc's MAC count of the configuration per latency and is stated against the
peak basis of ``benchmarks/peak.py`` (measured sgemm with OpenBLAS's overrides unset, and the
theoretical FMA peak), both taken at the start of the run.

Pruning efficiency = (latency full / latency variant) / (MACs full / MACs variant): 1.0 when a
MAC cut becomes the same cut in time. Per uniform configuration from the end-to-end latencies
above (whole model, frame included); per block variant, for blocks of at least 1 M MACs, from
the artifact's modules timed again before the runners start (TVM time evaluator, every module
of the model's blocks interleaved over 7 rounds in each of ``max(2, --processes)`` torch-free
worker processes; a variant's time over its block's full module's in the same process, then the
median and range over processes). The compile-time profile's figure is printed beside it (one
compile's measurement, fewer rounds).

Models: the MNIST example (``examples/mnist_resnet.py``; trains itself once), ResNet-18 and
MobileNetV2 in their ImageNet layouts (1000 classes, random seeded weights) built from the
layers of ``tests/zoo.py`` (``BasicBlock``, ``InvertedResidual``, ``cbr``), at 224 (or 32) input.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import peak  # noqa: E402 - benchmarks/peak.py, next to this file

MODELS = ["mnist_resnet", "resnet18-224", "mobilenetv2-224"]
KNOWN = MODELS + ["resnet18-32", "mobilenetv2-32", "cifar_resnet"]
RATIOS = (0.0, 0.25, 0.5, 0.75)
MIN_BLOCK_MACS = 1_000_000
BLOCK_ROUNDS = 7   # interleaved rounds of the block-variant timings in each worker

# A model.py for legoc (build_model / example_inputs) in ImageNet layout from tests/zoo.py's layers.
ZOO_SOURCE = '''"""{arch} (ImageNet layout, 1000 classes, random seeded weights) from tests/zoo.py's layers, {size}x{size}."""
import importlib.util

import torch
from torch import nn

_spec = importlib.util.spec_from_file_location("legoc_bench_zoo", {zoo!r})
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)
ARCH, SIZE = {arch!r}, {size}


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(zoo.cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [zoo.BasicBlock(cin, cout, stride), zoo.BasicBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileNetV2(nn.Module):
    # (expansion t, out channels c, repeats n, first stride s): the MobileNetV2 paper's table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, cin = [zoo.cbr(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(zoo.InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(zoo.cbr(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model():
    torch.manual_seed(0)
    model = {{"resnet18": ResNet18, "mobilenetv2": MobileNetV2}}[ARCH]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def example_inputs():
    torch.manual_seed(1)
    return (torch.randn(1, 3, SIZE, SIZE),)
'''


def model_file(name: str, folder: Path) -> Path:
    if "-" in name:
        arch, size = name.split("-")
        path = folder / f"{arch}_{size}.py"
        path.write_text(ZOO_SOURCE.format(arch=arch, size=int(size), zoo=str(ROOT / "tests" / "zoo.py")))
        return path
    return ROOT / "examples" / f"{name}.py"


# ---------------------------------------------------------------------------------------------
# Worker: one runner in a process of its own


def _worker(spec: dict):
    """``spec``'s runner set up in this process: its call (numpy in, numpy out)."""
    import numpy as np

    threads = spec["threads"]
    x = np.load(spec["input"])
    kind = spec["kind"]
    if kind == "eager":
        import torch

        from legoc.modelfile import load_model_file

        torch.set_num_threads(threads)
        model = load_model_file(spec["model"]).model.eval()
        tx = torch.from_numpy(x)

        def call():
            with torch.no_grad():
                return model(tx).numpy()
    elif kind == "ort":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(spec["onnx"], so, providers=["CPUExecutionProvider"])

        def call():
            return sess.run(None, {"x": x})[0]
    elif kind == "tvm":
        import tvm

        dev = tvm.cpu()
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(spec["library"]), dev)
        main_fn = vm["main"]
        with np.load(spec["params"]) as f:
            params = [tvm.runtime.tensor(f[f"arr_{i}"], dev) for i in range(len(f.files))]

        from legoc.runtime.executor import to_numpy

        # called as legoc's runtime calls its modules (legoc.runtime.executor): the input copied
        # into a tensor made once, the output copied out by the runtime's own to_numpy
        x_tensor = tvm.runtime.empty(x.shape, "float32", dev)
        x_buffer = np.from_dlpack(x_tensor)

        def call():
            np.copyto(x_buffer, x)
            return to_numpy(main_fn(x_tensor, *params))
    else:  # legoc: one configuration of an artifact
        from legoc.runtime.model import load

        runtime = load(spec["artifact"])
        runtime.configure(spec["variants"])

        def call():
            return runtime(x)
    return call


def _serve(spec: dict) -> None:
    """The worker process: set up, save the first output (``spec["output"]``), warm up, print
    ``ready``; then for every line N on stdin time N calls (after BATCH_WARMUP untimed ones) and
    print their times in ms as a JSON list; exit at end of input."""
    import numpy as np

    call = _worker(spec)
    out = call()
    if spec.get("output"):
        np.save(spec["output"], np.asarray(out))
    for _ in range(spec["warmup"]):
        call()
    clock = time.process_time if spec.get("clock") == "cpu" else time.perf_counter
    print("ready", flush=True)
    for line in sys.stdin:
        for _ in range(BATCH_WARMUP):
            call()
        times = []
        for _ in range(int(line)):
            t0 = clock()
            call()
            times.append((clock() - t0) * 1e3)
        print(json.dumps(times), flush=True)


BATCH_WARMUP = 2   # untimed calls at the start of every batch (caches after another runner)
SETTLE_S = 0.3     # pause between batches: TVM's and ORT's idle workers spin before they sleep


class Runner:
    """One runner in a process of its own, alive for the whole benchmark (:func:`_serve`)."""

    def __init__(self, spec: dict, log: Path):
        env = dict(os.environ)
        for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec["threads"])
        self.kind, self.log = spec["kind"], log
        self.batches = 0   # batches answered
        with open(log, "w") as err:   # a file, not a pipe nobody reads while the worker runs
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self._read()   # "ready"

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        while line and line.strip() != "ready" and not line.startswith("["):
            line = self.proc.stdout.readline()   # a library's own prints
        if not line:
            self.proc.kill()
            raise SystemExit(f"worker {self.kind} failed:\n{self.log.read_text()[-2000:]}")
        return line

    def time(self, calls: int) -> list[float]:
        """``calls`` timed calls, in ms."""
        self.proc.stdin.write(f"{calls}\n")
        self.proc.stdin.flush()
        times = json.loads(self._read())
        self.batches += 1
        return times

    def close(self) -> None:
        try:
            self.proc.stdin.close()   # end of input: the worker exits
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


# ---------------------------------------------------------------------------------------------
# One model


def bench_model(name: str, folder: Path, args) -> dict:
    import numpy as np
    import torch

    from legoc.modelfile import load_model_file
    from legoc.pipeline import CompileConfig, compile_model
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    path = model_file(name, folder)
    spec = load_model_file(path)
    model = spec.model.eval()
    inputs = tuple(spec.example_inputs)
    x = inputs[0].numpy()
    np.save(folder / f"{name}-x.npy", x)
    with torch.no_grad():
        ref = model(*inputs).numpy()

    art = folder / f"{name}.lego"
    options = dict(target="host", output=art, ratios=RATIOS, retrain_epochs=0, progress=False,
                   tune_trials=args.tune_trials, winograd=args.winograd)
    if args.round_to is not None:
        options["round_to"] = args.round_to
    report = compile_model(path, CompileConfig(**options))
    manifest = report.manifest
    total_macs = manifest["model"]["total_macs"]

    onnx_path = folder / f"{name}.onnx"
    torch.onnx.export(model, inputs, str(onnx_path), input_names=["x"], dynamo=False)
    built = build_module(model, inputs, get_target("host"), folder / f"{name}-mono.so", name=name,
                         tune_trials=args.tune_trials, prepack=True, winograd=args.winograd)
    np.savez(folder / f"{name}-mono-params.npz", *[np.asarray(p) for p in built.params])

    base = {"threads": args.threads, "input": str(folder / f"{name}-x.npy"), "warmup": 5, "clock": args.clock}
    runners = [("pytorch eager", {"kind": "eager", "model": str(path)}, total_macs),
               ("onnxruntime", {"kind": "ort", "onnx": str(onnx_path)}, total_macs),
               ("tvm monolithic", {"kind": "tvm", "library": str(built.path),
                                   "params": str(folder / f"{name}-mono-params.npz")}, total_macs)]
    segments = manifest["segments"]
    blocks = [s for s in segments if s["kind"] == "block"]
    frame_macs = sum(s["macs"] for s in segments if s["kind"] == "frame")
    for index, ratio in enumerate(RATIOS):
        macs = frame_macs + sum(b["variants"][index]["macs"] for b in blocks)
        label = "legoc full" if index == 0 else f"legoc r{ratio:.2f}"
        runners.append((label, {"kind": "legoc", "artifact": str(art), "variants": [index] * len(blocks)}, macs))

    procs: dict[str, list[Runner]] = {}
    try:
        for label, wspec, _ in runners:
            check = label in ("onnxruntime", "tvm monolithic", "legoc full")
            stem = f"{name}-{label.replace(' ', '_')}"
            procs[label] = []
            for i in range(args.processes):
                out = folder / f"{stem}-out{i}.npy"
                procs[label].append(Runner({**base, **wspec, "output": str(out) if check else None},
                                           folder / f"{stem}-{i}.log"))
                if check:
                    _check(name, label, np.load(out), ref)
        medians, times = interleaved_rounds(procs, args.rounds, max(1, args.runs // args.rounds), name)
    finally:
        for pool in procs.values():
            for proc in pool:
                proc.close()
    rows = [{"runner": label, "ms": statistics.median(times[label]), "lo": min(medians[label]),
             "hi": max(medians[label]), "round_medians": medians[label], "macs": macs,
             "paired_ort": paired_ratio(medians[label], medians["onnxruntime"])}
            for label, _, macs in runners]
    return {"rows": rows, "blocks": _block_efficiency(art, blocks, max(2, args.processes)), "round_to": manifest["options"]["round_to"],
            "winograd": manifest["options"]["winograd"],
            "overhead_paired": paired_ratio(medians["legoc full"], medians["tvm monolithic"])}


def interleaved_rounds(procs: dict, rounds: int, calls: int, name: str = "") -> tuple[dict, dict]:
    """Per runner label: the median of each round's batch, and all timed calls. Each round asks
    every runner of ``procs`` (label -> its processes, a list of :class:`Runner`; round ``r``
    asks the ``r % len``-th) for ``calls`` calls in turn, in reverse order on odd rounds,
    pausing :data:`SETTLE_S` between batches."""
    medians: dict[str, list[float]] = {label: [] for label in procs}
    times: dict[str, list[float]] = {label: [] for label in procs}
    labels = list(procs)
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            time.sleep(SETTLE_S)
            pool = procs[label]
            t = pool[r % len(pool)].time(calls)
            times[label] += t
            medians[label].append(statistics.median(t))
        print(f"{name}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return medians, times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a's round median over b's in the same round. Runners of one
    round run one after the other, so a slow spell of this shared machine (it comes and goes
    over tens of seconds and slows every process alike) mostly cancels in the ratio, where the
    ratio of the overall medians takes it in full for whichever runner it hit."""
    return statistics.median(x / y for x, y in zip(a, b))


def _block_efficiency(art: Path, blocks: list[dict], workers: int) -> list[dict]:
    """Per block variant of at least MIN_BLOCK_MACS: MACs, module latency and pruning efficiency,
    timed here by :func:`legoc.runtime.bench.measure_in_processes` in ``workers`` fresh
    processes (every module of every block interleaved over BLOCK_ROUNDS rounds within each; the
    workers inherit the ``TVM_NUM_THREADS`` that :func:`main` set). The efficiency is paired: a
    variant's against its own block's full module timed in the same process, then the median
    (and range) over processes; "profile ms" is the compile-time profile's figure."""
    import statistics

    from legoc.runtime.bench import measure_in_processes

    blocks = [b for b in blocks if b["variants"][0]["macs"] >= MIN_BLOCK_MACS]
    modules = [(b["name"], i) for b in blocks for i in range(len(b["variants"]))]
    if not modules:
        return []
    # exactly ``workers`` (no tie-break worker: a slow worker cancels in the paired ratio)
    timed = measure_in_processes(art, modules, processes=workers, tolerance=float("inf"), number=10,
                                 repeat=2 * BLOCK_ROUNDS, rounds=BLOCK_ROUNDS)
    runs = [w["modules"] for w in timed["workers"]]
    out, k = [], 0
    for b in blocks:
        full, first = b["variants"][0], k
        for v in b["variants"]:
            cut = full["macs"] / v["macs"]
            effs = [(t[first] / t[k]) / cut for t in runs]
            kept = "; ".join(f"{c[0]}→{c[-1]}" for c in v["channels"].values())
            out.append({"block": b["name"], "variant": v["id"], "macs": v["macs"],
                        "ms": statistics.median(t[k] for t in runs), "eff": statistics.median(effs),
                        "eff_lo": min(effs), "eff_hi": max(effs), "workers": len(runs),
                        "profile_ms": v["profile"]["latency_ms"]["value"], "channels": kept})
            k += 1
    return out


def _check(model: str, what: str, out, ref) -> None:
    import numpy as np

    err = float(np.abs(out - ref).max()) / max(float(np.abs(ref).max()), 1e-6)
    if err > 1e-3:
        raise SystemExit(f"{model}: {what} differs from PyTorch (relative error {err:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(KNOWN)}")
    ap.add_argument("--runs", type=int, default=200, help="timed calls per runner, over all rounds")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--round-to", type=int, default=None,
                    help="legoc compile's --round-to (default: the target's own default)")
    ap.add_argument("--no-winograd", dest="winograd", action="store_false",
                    help="3x3 stride-1 convs direct, not Winograd, in legoc's artifact and the monolithic module")
    ap.add_argument("--tune-trials", type=int, default=0,
                    help="MetaSchedule trials per new workload for the TVM rows (default 0: untuned)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: each call's CPU time of the worker process (with --threads 1 only): on a "
                         "loaded machine it leaves out the time the process waited for a core")
    ap.add_argument("--processes", type=int, default=1,
                    help="worker processes per runner, asked in turn round by round (default 1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _serve(json.loads(args.worker))
        return
    if args.processes < 1:
        raise SystemExit("--processes must be at least 1")
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu needs --threads 1 (a worker's CPU time sums its threads, spinning included)")
    for name in args.models.split(","):
        if name not in KNOWN:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(KNOWN)}")
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    from rich.console import Console

    basis = peak(args.threads)
    load = os.getloadavg()[0]
    tuned = f"MetaSchedule {args.tune_trials} trials/workload" if args.tune_trials else "legoc's rules, untuned"
    console = Console(width=160)
    console.print(f"peak basis: {basis.describe()}")
    console.print(f"load average at start {load:.1f} on {os.cpu_count()} cores; {args.threads} threads; "
                  f"{args.clock} clock; TVM {tuned}")
    results = {"peak": basis.__dict__, "load": load, "models": {}}
    with tempfile.TemporaryDirectory(prefix="legoc-bench-") as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            res = bench_model(name, folder, args)
            results["models"][name] = res
            _print_model(console, name, res, basis)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _print_model(console, name: str, res: dict, basis) -> None:
    from rich.table import Table

    rows = res["rows"]
    by = {r["runner"]: r for r in rows}
    full = by["legoc full"]
    convs = "" if res.get("winograd", True) else ", 3x3 convs direct (--no-winograd)"
    table = Table(title=f"{name}: batch 1 (legoc round_to {res['round_to']}{convs})")
    for col in ("runner", "ms (median)", "round medians", "× ORT", "× ORT paired", "× eager", "GMAC", "GFLOP/s",
                "% measured peak", "% theoretical", "speedup vs full", "MAC cut", "pruning eff."):
        table.add_column(col, justify="left" if col == "runner" else "right")
    for r in rows:
        gflops = 2 * r["macs"] / (r["ms"] * 1e-3) / 1e9
        pruned = r["runner"].startswith("legoc r")
        speedup = full["ms"] / r["ms"]
        cut = full["macs"] / r["macs"]
        table.add_row(r["runner"], f"{r['ms']:.3f}", f"{r['lo']:.3f}–{r['hi']:.3f}",
                      f"{r['ms'] / by['onnxruntime']['ms']:.2f}", f"{r['paired_ort']:.2f}",
                      f"{r['ms'] / by['pytorch eager']['ms']:.2f}",
                      f"{r['macs'] / 1e9:.3f}", f"{gflops:.1f}", f"{100 * gflops / basis.measured_gflops:.0f}%",
                      f"{100 * gflops / basis.theoretical_gflops:.0f}%",
                      f"{speedup:.2f}" if pruned else "", f"{cut:.2f}" if pruned else "",
                      f"{speedup / cut:.2f}" if pruned else "")
    mono = by["tvm monolithic"]["ms"]
    table.add_row("block-by-block overhead", f"{full['ms'] - mono:+.3f}", "", "",
                  f"{100 * (res['overhead_paired'] - 1):+.1f}%", "", "", "",
                  f"{100 * (full['ms'] / mono - 1):+.1f}%")
    console.print(table)
    if res["blocks"]:
        n = res["blocks"][0]["workers"]
        bt = Table(title=f"{name}: block variants of ≥ 1 M MACs (modules timed in {n} worker processes; "
                         f"efficiency paired within each, median and range over them)")
        for col in ("block", "variant", "MMAC", "ms", "profile ms", "pruning eff.", "range", "channels (original→kept)"):
            bt.add_column(col, justify="left" if col in ("block", "variant", "channels (original→kept)") else "right")
        for b in res["blocks"]:
            full = b["variant"] == "r0.00"
            bt.add_row(b["block"], b["variant"], f"{b['macs'] / 1e6:.2f}", f"{b['ms']:.3f}", f"{b['profile_ms']:.3f}",
                       "" if full else f"{b['eff']:.2f}", "" if full else f"{b['eff_lo']:.2f}–{b['eff_hi']:.2f}",
                       b["channels"][:70])
        console.print(bt)


if __name__ == "__main__":
    main()
