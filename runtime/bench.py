"""Latency of an artifact's modules and configurations, timed in a process of their own.

    python -m legoc.runtime.bench ART < request.json > result.json

``legoc compile`` times what it built through this module, in a fresh interpreter, because a
compiler process is a bad place to time anything: after torch has run (``torch.export``,
retraining) its OpenMP workers keep spinning on the cores and slow every module timed there.
The worker imports the runtime only, as an app on a board would.

Request (JSON): ``{"modules": [[segment, variant index], ...], "combinations": [[v0, v1, ...],
...], "inputs": "x.npz" or null, "number": 10, "repeat": 5, "warmup": 5, "calls": 50,
"rounds": 3}``. Modules are timed with TVM's time evaluator (median of ``repeat`` timings of
``number`` runs) on seeded random inputs of the segment's input shapes; combinations with the
runtime end to end (median of ``calls`` calls after ``warmup``) on the model inputs of
``inputs`` (arrays ``arr_0``, ``arr_1``, … in input order; random when null). Result:
``{"modules": [ms, ...], "combinations": [ms, ...], "threads": N}``.

Interleaved rounds: the timings of each module and the calls of each combination are spread
over ``rounds`` passes through the whole list, so a slow drift of the machine's speed hits every
item alike instead of whichever was timed last (a single pass turns the drift into estimator
error).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from legoc.errors import InternalError


def _random(meta: dict, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(meta["shape"]).astype(meta.get("dtype", "float32"))


def measure(path: Path, modules: Sequence[Sequence], combinations: Sequence[Sequence[int]] = (),
            inputs: Sequence[np.ndarray] | None = None, *, number: int = 10, repeat: int = 5,
            warmup: int = 5, calls: int = 50, rounds: int = 1) -> dict:
    """Time ``modules`` ((segment, variant index)) and ``combinations`` of the artifact at
    ``path`` in this process (see the module docstring; :func:`measure_in_subprocess` is the
    clean-process form)."""
    import statistics

    import tvm

    from legoc.runtime.model import Model, median_latency_ms
    from legoc.runtime.modules import Executable, WeightFiles

    rounds = max(1, int(rounds))
    model = Model(path)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    weights = WeightFiles(model.path)
    segments = {s["name"]: s for s in model.manifest["segments"]}
    module_times: list[list[float]] = []
    held = []   # (executable, inputs) of every module, kept for the rounds
    for name, index in modules:
        seg = model.segment(name)
        exe = Executable(model.path, seg, seg.variants[int(index)], dev, weights)
        args = [tvm.runtime.tensor(_random(segments[name]["tensors"][n], rng), dev) for n in seg.inputs]
        exe.main(*args, *exe.params)   # loads and warms the code
        if rounds == 1:   # one pass: time it now and free it (a whole model's modules need not fit)
            module_times.append(_module_timings(exe, args, dev, number, repeat))
        else:
            module_times.append([])
            held.append((exe, args))
    for r in range(rounds if held else 0):
        for times, (exe, args) in zip(module_times, held):
            times += _module_timings(exe, args, dev, number, _share(repeat, rounds, r))
    del held
    if inputs is None:
        inputs = [_random(i, rng) for i in model.manifest["inputs"]]
    combination_times = [[] for _ in combinations]
    for r in range(rounds):
        for k, choice in enumerate(combinations):
            model.configure(variants=list(choice))
            n = _share(calls, rounds, r)
            combination_times[k] += median_latency_ms(model, inputs, warmup=warmup if r == 0 else 2, calls=n,
                                                      all_times=True)
    return {"modules": [statistics.median(t) for t in module_times],
            "combinations": [statistics.median(t) for t in combination_times],
            "threads": int(tvm.get_global_func("runtime.NumThreads")())}


def _share(total: int, rounds: int, r: int) -> int:
    """Round ``r``'s part of ``total`` spread over ``rounds`` (at least 1 each)."""
    return max(1, total // rounds + (r < total % rounds))


def _module_timings(exe, args, dev, number: int, repeat: int) -> list[float]:
    """``repeat`` timings (ms, each the mean of ``number`` runs) of one module, time evaluator."""
    timer = exe.vm.time_evaluator("main", dev, number=number, repeat=repeat)
    return [float(t) * 1e3 for t in timer(*args, *exe.params).results]


def measure_in_subprocess(path: Path, modules: Sequence[Sequence], combinations: Sequence[Sequence[int]] = (),
                          inputs: Sequence[np.ndarray] | None = None, *, timeout_s: float = 1800, **options) -> dict:
    """:func:`measure` in a fresh interpreter (this Python, the same environment)."""
    import tempfile

    request = {"modules": [list(m) for m in modules], "combinations": [list(c) for c in combinations],
               "inputs": None, **options}
    with tempfile.TemporaryDirectory(prefix="legoc-bench-") as tmp:
        if inputs is not None:
            request["inputs"] = str(Path(tmp) / "inputs.npz")
            np.savez(request["inputs"], *[np.ascontiguousarray(a) for a in inputs])
        proc = subprocess.run([sys.executable, "-m", "legoc.runtime.bench", str(path)],
                              input=json.dumps(request), capture_output=True, text=True,
                              timeout=timeout_s, env=dict(os.environ))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise InternalError(f"timing {path} in a worker process failed (exit {proc.returncode}): "
                            + " | ".join(tail))
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise InternalError(f"timing {path} in a worker process gave no result: {proc.stdout[-500:]!r}") from exc


def measure_in_processes(path: Path, modules: Sequence[Sequence], combinations: Sequence[Sequence[int]] = (),
                         inputs: Sequence[np.ndarray] | None = None, *, processes: int = 2, tolerance: float = 0.10,
                         **options) -> dict:
    """:func:`measure_in_subprocess` in ``processes`` fresh workers, one after the other, and one
    more when two of them disagree on any item by more than ``tolerance`` (max / min - 1); each
    item's figure is the median over the workers. Result as :func:`measure`'s, plus
    ``"workers"``: every worker's result, and ``"spread"``: each item's (min, max) over them.

    Why: on a shared VM a worker process can run slow for a second or more of its life; the
    interleaved rounds inside one worker spread that over every item only when it lasts the
    whole measurement. Measured on MobileNetV2's 16 block modules (2026-12-06, one worker per
    measurement): one measurement in ten put an item 3.1x off the others' median (the worst of
    the other nine: 17%), and a compile's profile put a pruned variant 45% above its true time,
    slower than its full block; one worker's figures alone can misrank variants."""
    import statistics

    processes = max(1, int(processes))
    runs = [measure_in_subprocess(path, modules, combinations, inputs, **options) for _ in range(processes)]

    def columns(key: str) -> list[list[float]]:
        return [list(col) for col in zip(*(r[key] for r in runs))]

    def disagree() -> bool:
        return any(max(col) > (1 + tolerance) * min(col)
                   for key in ("modules", "combinations") for col in columns(key) if min(col) > 0)

    if processes >= 2 and disagree():
        runs.append(measure_in_subprocess(path, modules, combinations, inputs, **options))
    return {"modules": [statistics.median(c) for c in columns("modules")],
            "combinations": [statistics.median(c) for c in columns("combinations")],
            "threads": runs[0]["threads"], "workers": runs,
            "spread": {key: [(min(c), max(c)) for c in columns(key)] for key in ("modules", "combinations")}}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m legoc.runtime.bench ART < request.json", file=sys.stderr)
        return 2
    request = json.loads(sys.stdin.read())
    inputs = None
    if request.get("inputs"):
        with np.load(request["inputs"]) as data:
            inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
    options = {k: int(request[k]) for k in ("number", "repeat", "warmup", "calls", "rounds") if k in request}
    result = measure(Path(argv[0]), request.get("modules", []), request.get("combinations", []), inputs, **options)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
