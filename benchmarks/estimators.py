"""How wrong are legoc's combination estimators? Predicted vs measured for random combinations.

    .venv/bin/python benchmarks/estimators.py [--model examples/mnist_resnet.py] [--n 30] [--seed 0]
                                              [--artifact out/mnist-host.lego] [--json results.json]

Compiles the model for ``host`` (or uses ``--artifact``), then for ``--n`` random combinations
(one variant per block, seeded) compares the manifest-based estimates (legoc.runtime.estimate)
with measurements of the compiled artifact:

* accuracy: the model file's evaluate() on val_data(), with legoc.runtime (TVM, batch of the
  example inputs) as the model: the compiled code, not PyTorch;
* latency: legoc.runtime end to end in a torch-free worker process (legoc.runtime.bench), median
  of 50 calls in 5 interleaved rounds after 5 warm-up calls;
* memory: peak resident memory the configuration adds to a fresh process
  (``python -m legoc.runtime.memory``).

Latency is predicted three ways: from the compile-time profile as is; scaled by the slowdown
the runtime observes (``load(..., adapt_to_speed=True)``: the full-size configuration's measured
latency over its estimate, as an app that has been running it knows); and from modules re-timed
in the measuring worker with the compile-time fit redone there (the additive estimator's own
error, with the machine's drift between compile and now taken out).

Prints every combination, then the median and worst error of each estimator, and the host CPU
efficiency (achieved FLOP/s of every variant over the sgemm peak measured with numpy) that
``targets/calibration.py`` uses for boards. Targets (issue 5): median |accuracy error| <= 1
point, median relative latency error <= 10%, memory estimate never below the measured peak.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from legoc.modelfile import call_hook, load_model_file
from legoc.pipeline import CompileConfig, compile_model
from legoc.runtime import load
from legoc.runtime.artifact import read_manifest
from legoc.runtime.estimate import Profiles
from legoc.runtime.memory import measure_in_subprocess
from legoc.runtime import bench

ROOT = Path(__file__).resolve().parent.parent


class RuntimeAsTorch(torch.nn.Module):
    """legoc.runtime behind a torch interface, so the model file's evaluate() can score it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batch = model.input_shapes[0][0]

    def forward(self, x):
        outs = []
        for i in range(0, x.shape[0], self.batch):
            xi = x[i:i + self.batch].numpy()
            if xi.shape[0] < self.batch:  # pad the last partial batch
                pad = np.zeros((self.batch - xi.shape[0], *xi.shape[1:]), xi.dtype)
                out = self.model(np.concatenate([xi, pad]))[: xi.shape[0]]
            else:
                out = self.model(xi)
            outs.append(torch.from_numpy(np.asarray(out)))
        return torch.cat(outs)


def _retimed_profiles(manifest: dict, modules: list, module_ms: list, uniform: list, uniform_ms: list) -> Profiles:
    """The artifact's profiles with its module latencies replaced by ``module_ms`` and the
    scale/overhead fit of legoc compile redone on ``uniform_ms``."""
    import copy

    from legoc.targets.calibration import fit_latency

    m = copy.deepcopy(manifest)
    segs = {s["name"]: s for s in m["segments"]}
    for (name, i), ms in zip(modules, module_ms):
        segs[name]["variants"][i]["profile"]["latency_ms"] = {"value": ms, "source": "measured-local"}
    m.setdefault("combination", {}).pop("latency_scale", None)
    plain = Profiles(m)
    sums = [sum(v.latency_ms for v in plain.chosen(c) + plain.frame) for c in uniform]
    scale, overhead = fit_latency(sums, uniform_ms, plain.num_segments)
    m["combination"]["latency_scale"] = {"value": scale}
    m["combination"]["call_overhead_ms"] = {"value": overhead}
    return Profiles(m)


def gemm_peak_gflops(n: int = 1024, repeat: int = 10) -> float:
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "mnist_resnet.py"))
    ap.add_argument("--artifact", help="an artifact compiled from --model for host (default: compile one)")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    con = Console(width=140)

    spec = load_model_file(args.model)
    if spec.val_data is None or spec.evaluate is None:
        raise SystemExit(f"{args.model} needs val_data() and evaluate() for this benchmark")
    val = list(call_hook(spec.path, "val_data", spec.val_data))
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(args.artifact) if args.artifact else Path(tmp) / "model.lego"
        if not args.artifact:
            t0 = time.perf_counter()
            compile_model(args.model, CompileConfig(target="host", output=art, progress=False))
            con.print(f"compiled {art.name} for host in {time.perf_counter() - t0:.0f} s")
        manifest = read_manifest(art)
        prof = Profiles(manifest)
        model = load(art)
        x = [np.zeros(s, np.float32) for s in model.input_shapes]
        rng = random.Random(args.seed)
        choices = [tuple(rng.randrange(len(vs)) for vs in prof.blocks) for _ in range(args.n)]
        # latency: all combinations in one torch-free worker process, as an app on a board runs
        # them (in this process torch's OpenMP workers would share the cores with TVM's threads)
        # the same worker also re-times every module and the uniform configurations, so the
        # additive estimator can be judged apart from drift of this machine's speed between the
        # compile and now (a shared 2-core VM: its sgemm peak moved 90-198 GFLOP/s in one session)
        modules = [(seg["name"], i) for seg in manifest["segments"] for i in range(len(seg["variants"]))]
        n_uniform = min(len(vs) for vs in prof.blocks)
        uniform = [tuple([i] * len(prof.blocks)) for i in range(n_uniform)]
        timed = bench.measure_in_subprocess(art, modules, uniform + choices, x, warmup=5, calls=50, rounds=5)
        latencies = timed["combinations"][n_uniform:]
        retimed = _retimed_profiles(manifest, modules, timed["modules"], uniform, timed["combinations"][:n_uniform])
        # what a running app sees with load(..., adapt_to_speed=True): it has been running the
        # full-size configuration and knows its observed latency (Model.slowdown); the profile is
        # scaled by that before predicting the others
        slowdown = timed["combinations"][0] / prof.latency_ms(uniform[0])
        adapted = prof.slowed(slowdown)
        rows = []
        for k, (choice, lat) in enumerate(zip(choices, latencies)):
            est = prof.estimate(choice)
            model.configure(variants=list(choice))
            acc = float(spec.evaluate(RuntimeAsTorch(model), val))
            mem = measure_in_subprocess(art, choice)["peak_bytes"]
            rows.append({"choice": list(choice), "est_accuracy": est.accuracy, "accuracy": acc,
                         "est_latency_ms": est.latency_ms, "latency_ms": lat,
                         "est_latency_retimed_ms": retimed.latency_ms(choice),
                         "est_latency_adapted_ms": adapted.latency_ms(choice),
                         "est_memory_bytes": est.memory_bytes, "memory_bytes": mem})
            con.print(f"[{k + 1}/{len(choices)}] {choice}: accuracy {est.accuracy:.4f} est / {acc:.4f} meas, "
                      f"latency {est.latency_ms:.2f} / {lat:.2f} ms, memory {est.memory_bytes / 2**20:.2f} / "
                      f"{mem / 2**20:.2f} MiB")
        # host efficiency for targets/calibration.py
        peak = gemm_peak_gflops()
        eff = [2 * v["macs"] / (v["profile"]["latency_ms"]["value"] * 1e-3) / 1e9 / peak
               for s in manifest["segments"] for v in s["variants"] if v["profile"]["latency_ms"]["value"]]

    t = Table(title=f"{len(rows)} random combinations of {Path(args.model).name} on host: estimated vs measured")
    for col in ("variants", "acc. est.", "acc. meas.", "err (pts)", "lat. est. ms", "adapted est.", "re-timed est.",
                "lat. meas. ms", "err %",
                "mem est. MiB", "mem meas. MiB", "est/meas"):
        t.add_column(col, justify="left" if col == "variants" else "right")
    for r in rows:
        t.add_row(" ".join(map(str, r["choice"])), f"{r['est_accuracy']:.4f}", f"{r['accuracy']:.4f}",
                  f"{(r['est_accuracy'] - r['accuracy']) * 100:+.2f}", f"{r['est_latency_ms']:.2f}",
                  f"{r['est_latency_adapted_ms']:.2f}",
                  f"{r['est_latency_retimed_ms']:.2f}",
                  f"{r['latency_ms']:.2f}", f"{(r['est_latency_ms'] / r['latency_ms'] - 1) * 100:+.1f}",
                  f"{r['est_memory_bytes'] / 2**20:.2f}", f"{r['memory_bytes'] / 2**20:.2f}",
                  f"{r['est_memory_bytes'] / r['memory_bytes']:.3f}")
    con.print(t)
    acc_err = [abs(r["est_accuracy"] - r["accuracy"]) * 100 for r in rows]
    lat_err = [abs(r["est_latency_ms"] / r["latency_ms"] - 1) * 100 for r in rows]
    lat_err_adapted = [abs(r["est_latency_adapted_ms"] / r["latency_ms"] - 1) * 100 for r in rows]
    lat_err_retimed = [abs(r["est_latency_retimed_ms"] / r["latency_ms"] - 1) * 100 for r in rows]
    mem_ratio = [r["est_memory_bytes"] / r["memory_bytes"] for r in rows]
    summary = {
        "accuracy_abs_error_points": {"median": statistics.median(acc_err), "worst": max(acc_err)},
        "latency_rel_error_percent": {"median": statistics.median(lat_err), "worst": max(lat_err)},
        "latency_rel_error_percent_adapted": {"median": statistics.median(lat_err_adapted),
                                              "worst": max(lat_err_adapted), "slowdown": slowdown},
        "latency_rel_error_percent_retimed": {"median": statistics.median(lat_err_retimed),
                                              "worst": max(lat_err_retimed)},
        "memory_estimate_over_measured": {"min": min(mem_ratio), "median": statistics.median(mem_ratio),
                                          "max": max(mem_ratio), "below_measured": sum(m < 1 for m in mem_ratio)},
        "host_sgemm_peak_gflops": peak,
        "host_efficiency": {"median": statistics.median(eff), "min": min(eff), "max": max(eff)},
    }
    con.print(f"accuracy: median |error| {summary['accuracy_abs_error_points']['median']:.2f} points, worst "
              f"{summary['accuracy_abs_error_points']['worst']:.2f} (target: median <= 1)")
    con.print(f"latency: median relative error {summary['latency_rel_error_percent']['median']:.1f}%, worst "
              f"{summary['latency_rel_error_percent']['worst']:.1f}% (target: median <= 10%) with the compile-time "
              f"profile; {summary['latency_rel_error_percent_adapted']['median']:.1f}% (worst "
              f"{summary['latency_rel_error_percent_adapted']['worst']:.1f}%) scaled by the slowdown the runtime "
              f"observes on the full configuration ({slowdown:.2f}x); "
              f"{summary['latency_rel_error_percent_retimed']['median']:.1f}% (worst "
              f"{summary['latency_rel_error_percent_retimed']['worst']:.1f}%) with modules re-timed and the fit "
              f"redone in the measuring process")
    con.print(f"memory: estimate/measured min {min(mem_ratio):.3f}, median {statistics.median(mem_ratio):.3f}, "
              f"max {max(mem_ratio):.3f}; {summary['memory_estimate_over_measured']['below_measured']} below the "
              f"measured peak (target: 0)")
    con.print(f"host: sgemm peak {peak:.0f} GFLOP/s; variants reach {statistics.median(eff):.4f} of it (median; "
              f"min {min(eff):.4f}, max {max(eff):.4f}) -> targets/calibration.py EFFICIENCY['cpu']")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
