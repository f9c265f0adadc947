"""Where legoc's time goes against ONNX Runtime's, layer class by layer class, inside the real run.

    .venv/bin/python benchmarks/layers_vs_ort.py [--model mobilenetv2-224|resnet18-224] [--runs 2] [--threads 1]

Each side runs in processes of its own (alternating, ``--runs`` each), on ``--threads`` threads
(end to end is CPU time on 1 thread, wall-clock time on more):

* ONNX Runtime 1.30 (all graph optimizations) on the model's ONNX export, profiled with
  ``enable_profiling``: every node's kernel time, median over 60 calls.
* legoc's monolithic module (``build_module(prepack=True)``, as ``benchmarks/inference.py``
  builds it), its Relax VM instrumented: every kernel's time inside the run, median over 40 calls
  (built a second time with ``main`` as VM bytecode for that: the instrument sees only the
  interpreter's calls; end to end is the module as legoc builds it, ``main`` compiled).
  The instrument's own cost (a Python call before and after each kernel) is not in the kernel
  times but is in nothing else either: end to end is timed without it (median of 100). On more
  than 1 thread the kernel times run high: TVM's worker waits through each Python call, and
  legoc's sum of kernels came out above its end to end (ResNet-18, 2 threads: 21.4 vs 18.5 ms).

Both are grouped into classes by op and output width: a conv by its weight (``dw``: depthwise,
``pw-exp``/``pw-proj``: 1x1 that widens or narrows, ``conv3`` etc.: k x k), others by op name.
legoc's split expansions (``SplitExpandDepthwise``) and channel-blocked inverted residuals
(``BlockInvertedResidual``) count in their classes; the concat that joins split groups is a
class of its own. Each cell is the smallest of the runs.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _kind(inp, weight) -> str:
    if weight is None:
        return "other"
    if len(weight) == 5:  # prepacked [O/B, I, KH, KW, B]
        weight = [weight[0] * weight[4], weight[1], weight[2], weight[3]]
    if len(weight) != 4:
        return "fc"
    if weight[1] == 1 and weight[0] == inp[1] and inp[1] > 1:
        return "dw"
    if weight[2] == 1:
        return "pw-exp" if weight[0] > inp[1] else "pw-proj"
    return f"conv{weight[2]}"


def _blocked_kind(symbol: str, dims: list) -> tuple[str, int]:
    """(class, output width) of a kernel of a channel-blocked inverted residual: its blocked
    tensors are [N, C/B, H, W, B], so the width is the second last dimension there."""
    first, out = dims[0], dims[-1]
    width = out[3] if len(out) == 5 else out[-1]
    if "depthwise_blocked" in symbol:
        return "dw", width
    return ("pw-exp" if len(first) == 4 else "pw-proj"), width


def _spec(name: str, work: Path):
    sys.path.insert(0, str(HERE))
    from inference import model_file  # noqa: PLC0415 - benchmarks/inference.py's zoo models

    from legoc.modelfile import load_model_file

    spec = load_model_file(model_file(name, work))
    return spec.model.eval(), tuple(spec.example_inputs)


def _ort(name: str, work: Path) -> dict:
    import onnxruntime as ort
    import torch

    model, inputs = _spec(name, work)
    path = work / "m.onnx"
    torch.onnx.export(model, inputs, str(path), input_names=["x"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    x = {"x": inputs[0].numpy()}
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    e2e = _median_ms(lambda: plain.run(None, x), warm=30, calls=100)
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(60):
        session.run(None, x)
    times, classes = collections.defaultdict(list), {}
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args = event["args"]
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        outs = [next(iter(s.values())) for s in args.get("output_type_shape", [])]
        op = args.get("op_name")
        kind = _kind(shapes[0], shapes[1]) if op in ("Conv", "FusedConv", "NchwcConv") else op
        width = outs[0][-1] if outs and len(outs[0]) == 4 else 0
        times[event["name"]].append(event["dur"] / 1e3)
        classes[event["name"]] = f"{kind}|{width}"
    per_class = collections.defaultdict(float)
    for node, durations in times.items():
        per_class[classes[node]] += statistics.median(durations)
    return {"e2e": e2e, "classes": per_class}


def _legoc(name: str, work: Path) -> dict:
    import numpy as np
    import tvm
    import tvm.runtime.vm

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    model, inputs = _spec(name, work)
    dev = tvm.cpu()

    def load(mode: str):
        """The module built as legoc builds it, ``main`` compiled (end to end) or as VM bytecode
        (the instrument below sees only the interpreter's calls)."""
        built = build_module(model, inputs, get_target("host"), work / f"m-{mode}.so", name=name, prepack=True,
                             exec_mode=mode)
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), dev)
        params = [tvm.runtime.tensor(np.asarray(p), dev) for p in built.params]
        return vm, [tvm.runtime.tensor(inputs[0].numpy(), dev), *params]

    vm, args = load("compiled")
    main = vm["main"]
    e2e = _median_ms(lambda: main(*args).numpy(), warm=20, calls=100)
    vm, args = load("bytecode")
    main = vm["main"]
    per_call, started, shapes = collections.defaultdict(list), {}, {}

    def instrument(_func, symbol, before, _ret, *call_args):
        if before:
            started[symbol] = time.perf_counter()
            shapes.setdefault(symbol, [list(a.shape) for a in call_args if hasattr(a, "shape")])
        else:
            per_call[symbol].append((time.perf_counter() - started[symbol]) * 1e3)
        return 0

    vm.set_instrument(instrument)
    calls = 40
    for _ in range(calls):
        main(*args)
    per_class = collections.defaultdict(float)
    for symbol, durations in per_call.items():
        dims = shapes.get(symbol)
        if not dims:   # VM builtins (storage allocation) pass no tensors
            continue
        weight = dims[1] if len(dims) > 2 and len(dims[1]) in (4, 5) and "conv" in symbol else None
        out = dims[-1]
        width = out[-1] if len(out) == 4 else 0
        if "matmul" in symbol:
            kind = "fc"
        elif "_blocked" in symbol:   # a channel-blocked inverted residual (block_layout.py)
            kind, width = _blocked_kind(symbol, dims)
        elif "conv" in symbol:
            kind = _kind(dims[0], weight)
        else:
            kind = symbol.split("_")[1] if symbol.startswith("fused_") else symbol
        per_class[f"{kind}|{width}"] += statistics.median(durations) * (len(durations) // calls)
    return {"e2e": e2e, "classes": per_class}


def _threads() -> int:
    return int(os.environ.get("TVM_NUM_THREADS", "1"))


def _median_ms(call, *, warm: int, calls: int) -> float:
    """Median ms per call: CPU time on 1 thread (steadier on this VM), wall clock on more."""
    clock = time.process_time if _threads() == 1 else time.perf_counter
    for _ in range(warm):
        call()
    times = []
    for _ in range(calls):
        t0 = clock()
        call()
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2-224")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["ort", "legoc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as work:
            result = (_ort if args.worker == "ort" else _legoc)(args.model, Path(work))
        print(json.dumps(result))
        return
    env = dict(os.environ, TVM_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {"ort": [], "legoc": []}
    for i in range(args.runs):
        for side in runs:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--worker", side],
                                 capture_output=True, text=True, env=env, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                sys.exit(f"{side} worker failed:\n{out.stderr[-2000:]}")
            runs[side].append(json.loads(lines[-1]))
            print(f"run {i + 1}/{args.runs} {side}: end to end {runs[side][-1]['e2e']:.3f} ms", flush=True)
    keys = sorted({k for side in runs.values() for r in side for k in r["classes"]},
                  key=lambda k: (k.split("|")[0], -int(k.split("|")[1])))
    print(f"\n{args.model}, {args.threads} thread(s), ms per inference (smallest of {args.runs} runs)")
    print(f"{'class|width':<20}{'ORT':>8}{'legoc':>8}{'legoc-ORT':>11}")
    totals = [0.0, 0.0]
    for key in keys:
        ort_ms = min(r["classes"].get(key, 0.0) for r in runs["ort"])
        legoc_ms = min(r["classes"].get(key, 0.0) for r in runs["legoc"])
        totals[0] += ort_ms
        totals[1] += legoc_ms
        print(f"{key:<20}{ort_ms:8.3f}{legoc_ms:8.3f}{legoc_ms - ort_ms:+11.3f}")
    print(f"{'sum of kernels':<20}{totals[0]:8.3f}{totals[1]:8.3f}{totals[1] - totals[0]:+11.3f}")
    e2e = [min(r["e2e"] for r in runs[side]) for side in ("ort", "legoc")]
    print(f"{'end to end':<20}{e2e[0]:8.3f}{e2e[1]:8.3f}{e2e[1] - e2e[0]:+11.3f}   (legoc / ORT {e2e[1] / e2e[0]:.2f}x)")


if __name__ == "__main__":
    main()
