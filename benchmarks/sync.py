"""What a kernel boundary costs on the CPU: K tiny elementwise kernels in a row, each a parallel
loop over 64 rows (``--width`` floats each, so the fixed costs dominate), called through the
Relax VM in three forms:

* ``calls``  - K ``call_tir`` calls, one PrimFunc each: what a legoc module does (a VM call, a
  parallel launch and a join per kernel);
* ``loops``  - one ``call_tir`` of one PrimFunc holding the K loops: a launch and a join per loop,
  no VM call between them;
* ``region`` - the same PrimFunc with the K loops in one parallel launch and a barrier between two
  loops (TVM's ``pragma_parallel_launch_point`` and ``pragma_parallel_barrier_when_finish``, which
  its LLVM CPU code generator lowers to ``TVMBackendParallelBarrier``).

    .venv/bin/python benchmarks/sync.py [--threads 1,2] [--kernels 12] [--width 16]
                                        [--number 500] [--repeat 5] [--rounds 4]

Each thread count runs in a process of its own (TVM sizes its pool from ``TVM_NUM_THREADS`` once);
within it the three forms are timed in interleaved rounds (TVM's time evaluator, ``--number``
calls per repeat, the least of ``--repeat``), and the median over rounds is printed, per call and
per kernel. The three forms' outputs are checked equal before timing. What the difference between
``calls`` and ``region`` means for a legoc block: README, "CPU speed against ONNX Runtime".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

FORMS = ("calls", "loops", "region")


def modules(kernels: int, width: int) -> dict:
    """The three forms as Relax IRModules: main(x: [64, width]) -> [64, width], each kernel
    y = x * 1.0001 + 0.5."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.script import tirx as T  # noqa: PLC0415

    rows = 64

    @T.prim_func
    def step(a: T.Buffer((rows, width), "float32"), b: T.Buffer((rows, width), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.parallel(rows):
            for j in T.serial(width):
                b[i, j] = a[i, j] * T.float32(1.0001) + T.float32(0.5)

    # the K kernels inside one PrimFunc: a -> c[0] -> ... -> c[K-2] -> b (K loops, as K calls)
    @T.prim_func
    def chain(a: T.Buffer((rows, width), "float32"), b: T.Buffer((rows, width), "float32")):
        T.func_attr({"tirx.noalias": True})
        c = T.alloc_buffer((kernels - 1, rows, width), "float32")
        for i in T.parallel(rows):
            for j in T.serial(width):
                c[0, i, j] = a[i, j] * T.float32(1.0001) + T.float32(0.5)
        for k in T.serial(1, kernels - 1):
            for i in T.parallel(rows):
                for j in T.serial(width):
                    c[k, i, j] = c[k - 1, i, j] * T.float32(1.0001) + T.float32(0.5)
        for i in T.parallel(rows):
            for j in T.serial(width):
                b[i, j] = c[kernels - 2, i, j] * T.float32(1.0001) + T.float32(0.5)

    # the same loops in one parallel launch, a barrier after each but the last
    @T.prim_func
    def region(a: T.Buffer((rows, width), "float32"), b: T.Buffer((rows, width), "float32")):
        T.func_attr({"tirx.noalias": True})
        c = T.alloc_buffer((kernels - 1, rows, width), "float32")
        with T.attr(0, "pragma_parallel_launch_point", 1):
            with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                for i in T.parallel(rows):
                    for j in T.serial(width):
                        c[0, i, j] = a[i, j] * T.float32(1.0001) + T.float32(0.5)
            for k in T.serial(1, kernels - 1):
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    for i in T.parallel(rows):
                        for j in T.serial(width):
                            c[k, i, j] = c[k - 1, i, j] * T.float32(1.0001) + T.float32(0.5)
            for i in T.parallel(rows):
                for j in T.serial(width):
                    b[i, j] = c[kernels - 2, i, j] * T.float32(1.0001) + T.float32(0.5)

    out = relax.TensorType((rows, width), "float32")
    built = {}
    for form in FORMS:
        bb = relax.BlockBuilder()
        x = relax.Var("x", out)
        with bb.function("main", [x]):
            with bb.dataflow():
                if form == "calls":
                    gv, y = bb.add_func(step, "step"), x
                    for _ in range(kernels):
                        y = bb.emit(relax.call_tir(gv, (y,), out))
                else:
                    gv = bb.add_func(chain if form == "loops" else region, form)
                    y = bb.emit(relax.call_tir(gv, (x,), out))
                y = bb.emit_output(y)
            bb.emit_func_output(y)
        built[form] = bb.get()
    return built


def compile_forms(kernels: int, width: int) -> dict:
    """The three forms built for the host by legoc's CPU lowering: form -> Executable."""
    import tvm  # noqa: PLC0415

    from legoc.targets.schedules.pipeline import lowering_passes  # noqa: PLC0415
    from legoc.targets.table import TARGETS  # noqa: PLC0415

    target = TARGETS["host"].tvm_target()
    # the lowering legoc's CPU pipeline ends with, less its first pass (RewriteDataflowReshape
    # reads S-TIR blocks, which these hand-written PrimFuncs do not have)
    pipeline = tvm.transform.Sequential(lowering_passes(target)[1:])
    with target:
        return {form: tvm.compile(mod, target=target, relax_pipeline=pipeline)
                for form, mod in modules(kernels, width).items()}


def check(vms: dict, kernels: int, width: int):
    """Runs every form on one input and checks it against numpy; returns the input tensor."""
    import numpy as np  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    x = tvm.runtime.tensor(np.random.default_rng(0).random((64, width), dtype=np.float32), tvm.cpu())
    want = x.numpy()
    for _ in range(kernels):
        want = want * np.float32(1.0001) + np.float32(0.5)
    for form, vm in vms.items():
        np.testing.assert_allclose(vm["main"](x).numpy(), want, rtol=1e-5, err_msg=form)
    return x


def run(kernels: int, width: int, number: int, repeat: int, rounds: int) -> dict:
    """Times the three forms in this process (TVM's pool as TVM_NUM_THREADS sized it): the median
    over ``rounds`` of each form's least time per call (µs)."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    dev = tvm.cpu()
    vms = {form: relax.VirtualMachine(exe, dev) for form, exe in compile_forms(kernels, width).items()}
    x = check(vms, kernels, width)
    times: dict = {form: [] for form in FORMS}
    for _ in range(rounds):
        for form in FORMS:
            timer = vms[form].time_evaluator("main", dev, number=number, repeat=repeat)
            times[form].append(min(timer(x).results) * 1e6)
    return {form: statistics.median(ts) for form, ts in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, one process each")
    ap.add_argument("--kernels", type=int, default=12)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--number", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kernels < 2 or args.width < 1:
        ap.error("--kernels must be at least 2 and --width at least 1")
    if args.worker:
        print(json.dumps(run(args.kernels, args.width, args.number, args.repeat, args.rounds)))
        return 0
    print(f"{args.kernels} kernels of 64 x {args.width} floats; µs per call (median of {args.rounds} rounds), "
          f"then per kernel")
    print(f"{'threads':>7}  " + "  ".join(f"{f:>16}" for f in FORMS) + "  calls - region per kernel")
    for threads in (int(t) for t in args.threads.split(",")):
        env = dict(os.environ, TVM_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--worker", "--kernels", str(args.kernels), "--width", str(args.width),
               "--number", str(args.number), "--repeat", str(args.repeat), "--rounds", str(args.rounds)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"sync.py: the {threads}-thread worker failed: {done.stderr.strip().splitlines()[-1]}")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        cells = "  ".join(f"{res[f]:7.2f} ({res[f] / args.kernels:5.2f})" for f in FORMS)
        print(f"{threads:>7}  {cells}  {(res['calls'] - res['region']) / args.kernels:+.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
