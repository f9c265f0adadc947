"""Batch-1 inference latency: PyTorch eager, ONNX Runtime, one TVM module, and legoc's runtime.

    .venv/bin/python benchmarks/inference.py [--threads 2] [--models resnet18-32,resnet18-224,cifar_resnet,mnist_resnet]
                                             [--tune-trials N] [--runs 50]

For each model, in one run, on this machine, with the same thread count everywhere:

* ``eager``: the PyTorch model (``torch.set_num_threads``);
* ``onnxruntime``: the model exported to ONNX, ORT CPU provider, all graph optimizations;
* ``tvm monolithic``: the whole model compiled by ``legoc.targets.build.build_module`` (legoc's
  CPU schedules, or the tuning database with ``--tune-trials``) as one TVM module;
* ``legoc full``: ``legoc compile`` (ratios 0, 0.25, 0.5; no retraining) run block by block by
  ``legoc.runtime`` at full size; ``legoc r0.25``/``legoc r0.50``: every block at that ratio.

Every row times the same thing: numpy input in, numpy output out, median of ``--runs`` calls
after warm-up, taken in 5 rounds that interleave the runners (the machine is shared: a change of
load hits every row alike). GFLOP/s counts 2 x multiply-accumulates (legoc's MAC count of the configuration)
per latency, next to this machine's measured GEMM peak (numpy sgemm 2048^3, same threads).
ResNet-18 (ImageNet layout, 1000 classes, random weights) is written here at 32x32 and 224x224.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["resnet18-32", "resnet18-224", "cifar_resnet", "mnist_resnet"]
RATIOS = (0.0, 0.25, 0.5)
ROUNDS = 5  # measurement rounds, each running every runner in turn

# A model.py for legoc (build_model / example_inputs), written to a temporary folder per size.
RESNET18_SOURCE = '''"""ResNet-18 (ImageNet layout, random seeded weights), {size}x{size} input."""
import torch
from torch import nn

SIZE = {size}


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model():
    torch.manual_seed(0)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def example_inputs():
    torch.manual_seed(1)
    return (torch.randn(1, 3, SIZE, SIZE),)
'''


def _times_ms(fn, runs: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _median_ms(fn, runs: int, warmup: int = 5) -> float:
    return statistics.median(_times_ms(fn, runs, warmup))


def gemm_peak(runs: int = 10) -> float:
    import numpy as np

    n = 2048
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    ms = _median_ms(lambda: a @ b, runs, warmup=2)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def model_file(name: str, folder: Path) -> Path:
    if name.startswith("resnet18-"):
        size = int(name.split("-")[1])
        path = folder / f"resnet18_{size}.py"
        path.write_text(RESNET18_SOURCE.format(size=size))
        return path
    return ROOT / "examples" / f"{name}.py"


def bench_model(name: str, folder: Path, args) -> list[tuple[str, float, float]]:
    """[(row, latency ms, MACs)] for one model."""
    import onnxruntime as ort
    import torch
    import tvm

    from legoc.modelfile import load_model_file
    from legoc.pipeline import CompileConfig, compile_model
    from legoc.runtime.model import load
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    path = model_file(name, folder)
    spec = load_model_file(path)
    model = spec.model.eval()
    inputs = tuple(spec.example_inputs)
    x = inputs[0].numpy()

    # compile with legoc first (its MAC counts serve every row)
    art = folder / f"{name}.lego"
    report = compile_model(path, CompileConfig(target="host", output=art, ratios=RATIOS, retrain_epochs=0,
                                               progress=False, tune_trials=args.tune_trials))
    manifest = report.manifest
    total_macs = manifest["model"]["total_macs"]

    runners = []  # (row, call, MACs): every call takes numpy in and gives numpy out

    def eager():
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    ref = eager()
    runners.append(("pytorch eager", eager, total_macs))

    onnx_path = folder / f"{name}.onnx"
    torch.onnx.export(model, inputs, str(onnx_path), input_names=["x"], dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    runners.append(("onnxruntime", lambda: sess.run(None, {"x": x})[0], total_macs))

    built = build_module(model, inputs, get_target("host"), folder / f"{name}-mono.so", name=name,
                         tune_trials=args.tune_trials, prepack=True)
    dev = tvm.cpu()
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), dev)
    main_fn = vm["main"]
    params = [tvm.runtime.tensor(p, dev) for p in built.params]
    runners.append(("tvm monolithic",
                    lambda: main_fn(tvm.runtime.tensor(x, dev), *params).numpy(), total_macs))

    frame_macs = sum(s["macs"] for s in manifest["segments"] if s["kind"] == "frame")
    for index, ratio in enumerate(RATIOS):
        runtime = load(art)  # one runtime per configuration, so the rounds can interleave
        runtime.configure([index] * len(runtime.blocks))
        macs = frame_macs + sum(b.variants[index].macs for b in runtime.blocks)
        label = "legoc full" if index == 0 else f"legoc r{ratio:.2f}"
        runners.append((label, runtime, macs))

    for label, call, _ in runners:
        if label in ("onnxruntime", "tvm monolithic", "legoc full"):
            _check(name, label, call(x) if label == "legoc full" else call(), ref)
    # rounds interleave the runners, so a change of load on this shared machine hits all rows
    times: dict[str, list[float]] = {label: [] for label, _, _ in runners}
    per_round = max(1, args.runs // ROUNDS)
    for _ in range(ROUNDS):
        for label, call, _ in runners:
            fn = (lambda c=call: c(x)) if label.startswith("legoc") else call
            times[label].extend(_times_ms(fn, per_round))
    return [(label, statistics.median(times[label]), macs) for label, _, macs in runners]


def _check(model: str, what: str, out, ref) -> None:
    import numpy as np

    out = np.asarray(out)
    err = float(np.abs(out - ref).max()) / max(float(np.abs(ref).max()), 1e-6)
    if err > 1e-3:
        raise SystemExit(f"{model}: {what} differs from PyTorch (relative error {err:.2e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--tune-trials", type=int, default=0,
                    help="MetaSchedule trials per new workload for the TVM rows (default 0: untuned)")
    args = ap.parse_args()
    # thread counts must be set before numpy/torch/tvm start their pools
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    peak = gemm_peak()
    tuned = f"MetaSchedule {args.tune_trials} trials/workload" if args.tune_trials else "untuned"
    load = os.getloadavg()[0]
    table = Table(title=f"batch-1 latency, {args.threads} threads, TVM {tuned}; GEMM peak (numpy "
                        f"sgemm 2048³) {peak:.0f} GFLOP/s; load average at start {load:.1f} "
                        f"on {os.cpu_count()} cores")
    for col in ("model", "runner", "ms", "× ORT", "× eager", "GFLOP/s", "% GEMM peak"):
        table.add_column(col, justify="left" if col in ("model", "runner") else "right")
    with tempfile.TemporaryDirectory(prefix="legoc-bench-") as tmp:
        for name in args.models.split(","):
            rows = bench_model(name, Path(tmp), args)
            by = {label: ms for label, ms, _ in rows}
            for label, ms, macs in rows:
                gflops = 2 * macs / (ms * 1e-3) / 1e9
                table.add_row(name, label, f"{ms:.3f}", f"{ms / by['onnxruntime']:.2f}",
                              f"{ms / by['pytorch eager']:.2f}", f"{gflops:.1f}", f"{100 * gflops / peak:.0f}")
            mono, full = by["tvm monolithic"], by["legoc full"]
            table.add_row(name, "block-by-block overhead", f"{full - mono:+.3f}", "", "", "",
                          f"{100 * (full / mono - 1):+.1f}%")
            table.add_section()
            print(f"done {name}", file=sys.stderr, flush=True)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
