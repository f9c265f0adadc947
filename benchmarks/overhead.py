"""Block-by-block overhead in one process: a legoc artifact at full size, called as the runtime
calls it, against the monolithic TVM module of the same model, and each of the artifact's steps
timed alone (hot). CPU time per call (``--clock cpu``, the default; with 2 threads it sums
both threads, spinning included) or wall time (``--clock wall``), medians; TVM_NUM_THREADS from
--threads.

    .venv/bin/python benchmarks/overhead.py [--model mobilenetv2-224] [--threads 1] [--calls 40]
                                            [--clock cpu|wall]

The artifact (--ratios, default 0 and 0.5; no retraining) and the monolithic module are built into --work
(reused when present; the default folder is named after a digest of legoc's compiler sources, so
builds by older code are not reused).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def _build(name: str, work: Path, ratios: tuple[float, ...]) -> None:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import model_file  # noqa: PLC0415 - benchmarks/inference.py's zoo models

    from legoc.modelfile import load_model_file
    from legoc.pipeline import CompileConfig, compile_model
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    path = model_file(name, work)
    spec = load_model_file(path)
    inputs = tuple(spec.example_inputs)
    np.save(work / f"{name}-x.npy", inputs[0].numpy())
    compile_model(path, CompileConfig(target="host", output=work / f"{name}.lego", ratios=ratios,
                                      retrain_epochs=0, progress=False))
    built = build_module(spec.model.eval(), inputs, get_target("host"), work / f"{name}-mono.so", name=name,
                         prepack=True)
    np.savez(work / f"{name}-mono-params.npz", *[np.asarray(p) for p in built.params])


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}


def _median_ms(fn, calls: int, clock=time.process_time) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2-224")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--work", help="where the builds go (default: /tmp/legoc-overhead-<digest of "
                                   "legoc's compiler sources>, so a changed compiler never reuses old builds)")
    ap.add_argument("--clock", choices=tuple(CLOCK), default="cpu")
    ap.add_argument("--ratios", default="0,0.5", help="the artifact's ratios (when --work has none yet)")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.work is None:
        from legoc.targets.build import build_signature  # noqa: PLC0415

        args.work = f"/tmp/legoc-overhead-{build_signature()['compiler']}"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / f"{args.model}.lego").exists():
        _build(args.model, work, tuple(float(r) for r in args.ratios.split(",")))

    import numpy as np
    import tvm
    import tvm.runtime.vm

    from legoc.runtime.model import load

    x = np.load(work / f"{args.model}-x.npy")
    dev = tvm.cpu()
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(work / f"{args.model}-mono.so")), dev)
    with np.load(work / f"{args.model}-mono-params.npz") as f:
        params = [tvm.runtime.tensor(f[f"arr_{i}"], dev) for i in range(len(f.files))]
    main_fn, xt = vm["main"], tvm.runtime.tensor(x, dev)
    model = load(work / f"{args.model}.lego")
    model.configure([0] * len(model.blocks))
    for _ in range(2):   # two passes: the spread between them is the noise
        mono = _median_ms(lambda: main_fn(xt, *params).numpy(), args.calls, CLOCK[args.clock])
        legoc = _median_ms(lambda: model(x), args.calls, CLOCK[args.clock])
        print(f"monolithic {mono:.3f} ms, legoc full {legoc:.3f} ms: {legoc / mono - 1:+.1%}")
    env = {(model.input_names[0], "cpu"): tvm.runtime.tensor(x, dev)}
    total = 0.0
    # each step alone, hot, on the inputs the chain gives it (the executor's compiled steps)
    for (fn, ins, outs), step in zip(model._executor.compiled, model.steps):
        step_args = [env[k] for k in ins]
        env.update(zip(outs, fn(*step_args)))
        ms = _median_ms(lambda: fn(*step_args), args.calls, CLOCK[args.clock])
        total += ms
        print(f"  {getattr(step, 'segment', type(step).__name__)}: {ms:.3f} ms")
    print(f"  steps alone, summed: {total:.3f} ms")


if __name__ == "__main__":
    main()
